"""Solve a problem set against an OpenAI-compatible server (+ code sandbox), write JSONL, compute metrics.

    metrics = evaluate_problems(base_url, model, problems, prompts, sandbox_url=..., samples=4,
                                temperature=0.7, tokens_to_generate=4096, max_code_executions=8,
                                out_jsonl=path)

`prompts[i]` is the fully rendered prompt of `problems[i]` (the caller applies the chat template, e.g.
`mathforge.data.prompts.render_chat`). With `sandbox_url=None` nothing is executed (plain completions).

Output: one JSON line per sample (problems in input order, samples by index), NeMo-Skills-like: the
problem's own fields (`id`, `problem`, `expected_answer`, `split`, `source`) plus `problem_id`,
`sample_index`, `seed`, `generation`, `predicted_answer`, `is_correct` (and NeMo-Skills' name for it,
`symbolic_correct`), `num_generated_tokens`, `generation_time`, `generation_start_time`,
`generation_end_time`, `code_rounds_executed`, `num_code_timeouts`, `code_execution_time`, `llm_calls`,
`finish_reason` ("stop" | "length" | "cancelled" | "error"), `completed`, `cancelled`, `error`, and the
problem-level `problem_stop_reason` and `problem_answer` (the solver's voted answer).

Metrics (fractions in [0, 1], not NeMo-Skills' percentages), k = `samples`:
  accuracy              is_correct of sample 0 (the greedy answer when temperature is 0), mean over problems
  pass_at_k             unbiased pass@k over each problem's samples (all samples, cancelled ones included
                        with their partial text), mean over problems
  pass_at_1             the same estimator with k=1 = mean correctness (NeMo-Skills' pass@1[avg-of-k])
  maj_at_k              NeMo-Skills' majority@k over the first k finished samples with an answer (all
                        samples, partial answers included, if there is none), mean over problems
  solver_accuracy       the voted answer (`problem_answer`) is correct, mean over problems
  mean_tokens           generated tokens per sample
  time_per_problem_s    wall time per problem (mean)
  code_executions_mean  code cells executed per sample
  code_timeouts         code cells that timed out, in total
  num_problems, num_samples (= samples per problem, k), num_generations (rows), num_cancelled,
  num_errors, no_answer (fraction of samples without an answer), early_stopped (problems stopped early),
  total_time_s
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from mathforge.errors import UserError
from mathforge.solve.client import CompletionsClient
from mathforge.solve.code_loop import (
    OPENMATH_CODE_TAGS,
    CodeExecutionConfig,
    CodeExecutionLoop,
    CodeTags,
    Sampling,
)
from mathforge.solve.grading import is_correct, majority_at_k, pass_at_k
from mathforge.solve.sampler import EarlyStopping, ProblemResult, TimeBudget, solve_problem
from mathforge.solve.sandbox_client import SandboxClient

METRIC_NAMES = (
    "accuracy",
    "pass_at_k",
    "maj_at_k",
    "mean_tokens",
    "time_per_problem_s",
    "code_executions_mean",
    "code_timeouts",
    "num_problems",
    "num_samples",
)


def _field(problem: Any, name: str, default: Any = None) -> Any:
    if isinstance(problem, dict):
        return problem.get(name, default)
    return getattr(problem, name, default)


def _report(progress: Any, done: int, total: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(done)
    else:
        progress(done, total)


def problem_rows(problem: Any, result: ProblemResult) -> list[dict]:
    """The JSONL rows of one solved problem, graded."""
    expected = _field(problem, "expected_answer")
    pid = _field(problem, "id")
    rows = []
    for s in result.samples:
        rec = s.record
        correct = is_correct(expected, s.predicted_answer)
        rows.append(
            {
                "id": pid,
                "problem_id": pid,
                "problem": _field(problem, "problem"),
                "expected_answer": expected,
                "split": _field(problem, "split"),
                "source": _field(problem, "source"),
                "sample_index": s.index,
                "seed": s.seed,
                "generation": rec.generation,
                "predicted_answer": s.predicted_answer,
                "is_correct": correct,
                "symbolic_correct": correct,
                "num_generated_tokens": rec.num_generated_tokens,
                "generation_time": round(rec.generation_time, 4),
                "generation_start_time": s.start_time,
                "generation_end_time": s.end_time,
                "code_rounds_executed": rec.code_rounds_executed,
                "num_code_timeouts": rec.num_code_timeouts,
                "code_execution_time": round(rec.code_execution_time, 4),
                "llm_calls": rec.llm_calls,
                "finish_reason": s.finish_reason,
                "completed": s.completed,
                "cancelled": s.cancelled,
                "error": s.error,
                "problem_stop_reason": result.stop_reason,
                "problem_answer": result.answer,
                "problem_time_s": round(result.elapsed_s, 4),
            }
        )
    return rows


def compute_metrics(rows_by_problem: Sequence[Sequence[dict]], samples: int, total_time_s: float) -> dict:
    """Metrics (see module docstring) from the graded rows of each problem."""
    n_problems = len(rows_by_problem)
    all_rows = [r for rows in rows_by_problem for r in rows]

    def mean(values: Sequence[float]) -> float:
        return float(sum(values) / len(values)) if values else 0.0

    accuracy, pass_k, pass_1, maj_k, solver = [], [], [], [], []
    for rows in rows_by_problem:
        rows = sorted(rows, key=lambda r: r["sample_index"])
        correct = [bool(r["is_correct"]) for r in rows]
        accuracy.append(float(correct[0]))
        pass_k.append(pass_at_k(len(rows), sum(correct), min(samples, len(rows))))
        pass_1.append(pass_at_k(len(rows), sum(correct), 1))
        voters = [r for r in rows if r["completed"] and r["predicted_answer"] is not None] or rows
        maj_k.append(
            majority_at_k([r["predicted_answer"] for r in voters], [r["is_correct"] for r in voters], samples)
        )
        answer = rows[0]["problem_answer"]
        solver.append(float(is_correct(rows[0]["expected_answer"], answer)))
    return {
        "accuracy": mean(accuracy),
        "pass_at_k": mean(pass_k),
        "maj_at_k": mean(maj_k),
        "mean_tokens": mean([r["num_generated_tokens"] for r in all_rows]),
        "time_per_problem_s": mean([rows[0]["problem_time_s"] for rows in rows_by_problem if rows]),
        "code_executions_mean": mean([r["code_rounds_executed"] for r in all_rows]),
        "code_timeouts": int(sum(r["num_code_timeouts"] for r in all_rows)),
        "num_problems": n_problems,
        "num_samples": int(samples),
        "pass_at_1": mean(pass_1),
        "solver_accuracy": mean(solver),
        "no_answer": mean([float(r["predicted_answer"] is None) for r in all_rows]),
        "num_generations": len(all_rows),
        "num_cancelled": sum(1 for r in all_rows if r["cancelled"]),
        "num_errors": sum(1 for r in all_rows if r["error"]),
        "early_stopped": sum(
            1 for rows in rows_by_problem if rows and rows[0]["problem_stop_reason"] not in ("all_done",)
        ),
        "total_time_s": round(total_time_s, 3),
    }


async def evaluate_problems_async(
    base_url: str,
    model: str,
    problems: Sequence[Any],
    prompts: Sequence[str],
    *,
    sandbox_url: str | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int = 0,
    tokens_to_generate: int = 2048,
    max_code_executions: int = 8,
    code_execution_timeout: float = 10.0,
    max_code_output_characters: int = 1000,
    add_remaining_code_executions: bool = False,
    stop_phrases: Sequence[str] = (),
    stop_after_n_completed: int | None = None,
    stop_after_n_seconds: float | None = None,
    stop_after_n_same_answer: int | None = None,
    time_budget_s: float | None = None,
    time_budget_max_extra_s: float | None = None,
    concurrent_problems: int = 1,
    code_tags: CodeTags = OPENMATH_CODE_TAGS,
    api_key: str | None = None,
    out_jsonl: str | Path | None = None,
    progress: Callable[[int, int], None] | Any | None = None,
) -> dict:
    """Async form of `evaluate_problems` (same arguments)."""
    if len(problems) != len(prompts):
        raise ValueError(f"{len(problems)} problems but {len(prompts)} prompts: they must be aligned")
    if samples < 1 or tokens_to_generate < 1 or concurrent_problems < 1:
        raise ValueError("samples, tokens_to_generate and concurrent_problems must be >= 1")
    early = EarlyStopping(stop_after_n_completed, stop_after_n_seconds, stop_after_n_same_answer)
    budget = None
    if time_budget_s is not None:
        extra = 0.6 * time_budget_s if time_budget_max_extra_s is None else time_budget_max_extra_s
        budget = TimeBudget(time_budget_s, extra)
    sampling = Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop_phrases=tuple(stop_phrases),
    )
    config = CodeExecutionConfig(
        max_code_executions=max_code_executions,
        code_execution_timeout=code_execution_timeout,
        max_code_output_characters=max_code_output_characters,
        add_remaining_code_executions=add_remaining_code_executions,
    )
    out_path = Path(out_jsonl) if out_jsonl is not None else None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    total = len(problems)
    rows_by_problem: list[list[dict] | None] = [None] * total
    started = time.monotonic()
    semaphore = asyncio.Semaphore(concurrent_problems)
    done_count = 0
    next_to_write = 0
    client = CompletionsClient(base_url, model, api_key=api_key)
    sandbox = SandboxClient(sandbox_url) if sandbox_url else None
    out_file = None
    try:
        if sandbox is not None:
            try:
                await sandbox.health()
            except Exception as exc:
                raise UserError(f"code sandbox at {sandbox_url} is not healthy: {exc}") from exc
        if out_path is not None:
            out_file = out_path.open("w", encoding="utf-8")
        loop = CodeExecutionLoop(client, sandbox, tags=code_tags, config=config)

        async def one(i: int) -> None:
            nonlocal done_count, next_to_write
            async with semaphore:
                allowance = budget.reserve() if budget is not None else None
                problem_start = time.monotonic()
                try:
                    result = await solve_problem(
                        loop,
                        prompts[i],
                        samples=samples,
                        tokens_to_generate=tokens_to_generate,
                        sampling=sampling,
                        seed=seed,
                        early_stopping=early,
                        time_limit_s=allowance,
                    )
                finally:
                    if budget is not None:
                        budget.release(allowance, time.monotonic() - problem_start)
            rows_by_problem[i] = await asyncio.to_thread(problem_rows, problems[i], result)
            done_count += 1
            while (
                out_file is not None and next_to_write < total and rows_by_problem[next_to_write] is not None
            ):
                for row in rows_by_problem[next_to_write]:
                    out_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                out_file.flush()
                next_to_write += 1
            _report(progress, done_count, total)

        tasks = [asyncio.create_task(one(i)) for i in range(total)]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                where = base_url + (f" or the sandbox at {sandbox_url}" if sandbox_url else "")
                raise UserError(f"cannot connect ({exc}): is the server at {where} up?") from exc
            raise
    finally:
        if out_file is not None:
            out_file.close()
        await client.close()
        if sandbox is not None:
            await sandbox.close()
    finished = [r for r in rows_by_problem if r is not None]
    errors = [row["error"] for rows in finished for row in rows if row["error"]]
    if errors and len(errors) == sum(len(rows) for rows in finished):
        raise UserError(f"every generation failed; the first error: {errors[0]}")
    return compute_metrics(finished, samples, time.monotonic() - started)


def evaluate_problems(
    base_url: str, model: str, problems: Sequence[Any], prompts: Sequence[str], **kwargs
) -> dict:
    """Solve `problems` (objects or dicts with `id`, `problem`, `expected_answer`) from their rendered
    `prompts`; write one JSONL row per sample to `out_jsonl`; return the metrics dict.

    Keyword arguments: sandbox_url (None = no code execution), samples, temperature, top_p, top_k, min_p,
    repetition_penalty, seed, tokens_to_generate, max_code_executions, code_execution_timeout,
    max_code_output_characters, add_remaining_code_executions, stop_phrases, stop_after_n_completed,
    stop_after_n_seconds, stop_after_n_same_answer, time_budget_s (AIMO-2 per-problem base; unused time
    is pooled), time_budget_max_extra_s (default 0.6 x base, AIMO's 210/350), concurrent_problems,
    code_tags, api_key, out_jsonl, progress (callable(done, total) or an object with `.update(done)`).
    Safe to call from a thread or from inside a running event loop (it then runs in its own thread).
    """
    coro = evaluate_problems_async(base_url, model, problems, prompts, **kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=runner, name="evaluate-problems")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
