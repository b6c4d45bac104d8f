"""Many solutions per problem, concurrently, with early stopping and an AIMO-2-style time budget.

`solve_problem` starts N samples of one prompt at once (asyncio tasks; sample i uses seed `seed + i`, as
NeMo-Skills' `random_seed` per run) and stops as soon as one rule fires:

* `stop_after_n_completed=M`  — M samples finished (the AIMO-2 straggler rule: cancel the last pending ones
  once the others are done; the NeMo-Skills notebook cancels 12 after 10);
* `stop_after_n_same_answer=K` — K finished samples have the same extracted answer (mathematical
  equivalence, `grading.answer_groups`; samples without an answer never agree); the AIMO-2 submission
  stopped when the first 4-5 of 16 agreed;
* `stop_after_n_seconds=T`   — T seconds since the problem started (time-constrained generation: the
  answer is then taken from whatever text the samples have).

The remaining samples are cancelled: their tasks are cancelled, which closes their HTTP streams, so the
server frees their slots at once. Cancelled samples keep their partial text (`cancelled=True`).

`TimeBudget` is the AIMO-2 time rule: each problem gets `base_s` (350 s there) plus up to `max_extra_s`
(210 s) drawn from a shared buffer, and the time a problem leaves unused goes back into the buffer for the
problems after it. The buffer is drawn from when a problem starts, so problems solved concurrently cannot
spend the same seconds twice.

The problem's answer (`ProblemResult.answer`) is the largest group of equivalent answers among the finished
samples (ties: the group that formed first); when no finished sample has an answer, among the partial
answers of the cancelled ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import httpx

from mathforge.solve.client import CompletionError
from mathforge.solve.code_loop import CodeExecutionLoop, Generation, Sampling
from mathforge.solve.grading import answer_groups, extract_answer


@dataclass
class EarlyStopping:
    stop_after_n_completed: int | None = None
    stop_after_n_seconds: float | None = None
    stop_after_n_same_answer: int | None = None

    def __post_init__(self) -> None:
        for name in ("stop_after_n_completed", "stop_after_n_same_answer"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        if self.stop_after_n_seconds is not None and self.stop_after_n_seconds <= 0:
            raise ValueError(f"stop_after_n_seconds must be > 0 (got {self.stop_after_n_seconds})")


class TimeBudget:
    """Per-problem time with a shared buffer of unused time (AIMO-2: base 350 s, up to 210 s extra)."""

    def __init__(
        self, base_s: float = 350.0, max_extra_s: float = 210.0, initial_buffer_s: float = 0.0
    ) -> None:
        if base_s <= 0 or max_extra_s < 0 or initial_buffer_s < 0:
            raise ValueError("TimeBudget needs base_s > 0, max_extra_s >= 0 and initial_buffer_s >= 0")
        self.base_s = float(base_s)
        self.max_extra_s = float(max_extra_s)
        self.buffer_s = float(initial_buffer_s)

    def reserve(self) -> float:
        """Seconds this problem may use: the base plus what it draws from the buffer (taken out now)."""
        extra = min(self.max_extra_s, self.buffer_s)
        self.buffer_s -= extra
        return self.base_s + extra

    def release(self, allowance_s: float, used_s: float) -> None:
        """The problem is done: what it did not use of its allowance goes (back) into the buffer."""
        self.buffer_s += max(0.0, allowance_s - used_s)


@dataclass
class SampleResult:
    index: int
    seed: int | None
    record: Generation
    predicted_answer: str | None = None
    cancelled: bool = False
    error: str | None = None
    start_time: float = 0.0  # epoch seconds
    end_time: float = 0.0

    @property
    def completed(self) -> bool:
        return self.record.completed and not self.cancelled and self.error is None

    @property
    def finish_reason(self) -> str | None:
        if self.cancelled:
            return "cancelled"
        if self.error is not None:
            return "error"
        return self.record.finish_reason


@dataclass
class ProblemResult:
    samples: list[SampleResult]  # in sample-index order
    answer: str | None
    stop_reason: str  # "all_done" | "same_answer" | "n_completed" | "time"
    elapsed_s: float
    allowance_s: float | None = None
    completion_order: list[int] = field(default_factory=list)


def _voted_answer(samples: list[SampleResult], order: list[int]) -> str | None:
    finished = [samples[i] for i in order if samples[i].completed and samples[i].predicted_answer is not None]
    pool = finished or [s for s in samples if s.predicted_answer is not None]
    groups = answer_groups([s.predicted_answer for s in pool])
    return pool[groups[0][0]].predicted_answer if groups else None


async def solve_problem(
    loop: CodeExecutionLoop,
    prompt: str,
    *,
    samples: int,
    tokens_to_generate: int,
    sampling: Sampling | None = None,
    seed: int = 0,
    early_stopping: EarlyStopping | None = None,
    time_limit_s: float | None = None,
    max_code_executions: int | None = None,
    extract: Callable[[str], str | None] = extract_answer,
    on_sample_done: Callable[[SampleResult], None] | None = None,
) -> ProblemResult:
    """Run `samples` solutions of `prompt` concurrently; stop early by `early_stopping` / `time_limit_s`.

    Connection failures (server or sandbox unreachable) cancel the rest and raise; a request the server
    rejects (HTTP error, error event) marks that one sample as errored.
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    sampling = sampling or Sampling()
    early = early_stopping or EarlyStopping()
    limits = [t for t in (early.stop_after_n_seconds, time_limit_s) if t is not None]
    deadline_s = min(limits) if limits else None
    started = time.monotonic()
    results = [
        SampleResult(index=i, seed=seed + i, record=Generation(), start_time=time.time())
        for i in range(samples)
    ]
    tasks: dict[asyncio.Task, int] = {}
    for i, res in enumerate(results):
        task = asyncio.create_task(
            loop.generate(
                prompt,
                tokens_to_generate=tokens_to_generate,
                sampling=replace(sampling, seed=res.seed),
                record=res.record,
                max_code_executions=max_code_executions,
            ),
            name=f"sample-{i}",
        )
        tasks[task] = i
    pending = set(tasks)
    order: list[int] = []
    stop_reason = "all_done"
    fatal: BaseException | None = None
    try:
        while pending:
            timeout = None if deadline_s is None else deadline_s - (time.monotonic() - started)
            if timeout is not None and timeout <= 0:
                stop_reason = "time"
                break
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                stop_reason = "time"
                break
            for task in sorted(done, key=lambda t: tasks[t]):
                res = results[tasks[task]]
                res.end_time = time.time()
                exc = task.exception()
                if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                    fatal = exc  # nothing answers: every other sample would fail the same way
                elif isinstance(exc, CompletionError | httpx.HTTPError):
                    res.error = f"{type(exc).__name__}: {exc}"
                elif exc is not None:
                    fatal = exc
                res.predicted_answer = extract(res.record.generation)
                order.append(res.index)
                if on_sample_done is not None:
                    on_sample_done(res)
            if fatal is not None:
                stop_reason = "error"
                break
            finished = [results[i] for i in order if results[i].completed]
            if early.stop_after_n_completed is not None and len(finished) >= early.stop_after_n_completed:
                stop_reason = "n_completed"
                break
            if early.stop_after_n_same_answer is not None:
                # off the event loop: a symbolic comparison may take a while; the streams keep flowing
                groups = await asyncio.to_thread(answer_groups, [s.predicted_answer for s in finished])
                if groups and len(groups[0]) >= early.stop_after_n_same_answer:
                    stop_reason = "same_answer"
                    break
    finally:
        # cancel the stragglers: cancelling a task closes its HTTP stream (and sandbox session)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for task in pending:
        res = results[tasks[task]]
        res.cancelled = True
        res.end_time = time.time()
        res.predicted_answer = extract(res.record.generation)
        if on_sample_done is not None:
            on_sample_done(res)
    if fatal is not None:
        raise fatal
    if not pending and stop_reason in ("n_completed", "same_answer"):
        stop_reason = "all_done"  # the rule fired with the last samples: nothing was stopped
    return ProblemResult(
        samples=results,
        answer=_voted_answer(results, order),
        stop_reason=stop_reason,
        elapsed_s=time.monotonic() - started,
        allowance_s=time_limit_s,
        completion_order=order,
    )
