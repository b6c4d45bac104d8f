"""The code-execution generation loop, with NeMo-Skills' semantics (`CodeExecutionWrapper`, reference §2).

One solution = up to `max_code_executions + 1` streamed completions of a growing prompt:

1. complete the prompt with `code_end` (`</tool_call>`) added to the stop strings, `max_tokens` = what is
   left of ONE `tokens_to_generate` budget for the whole solution (tokens counted from `usage`; the code
   output we insert is not charged, as in NeMo-Skills);
2. OpenAI-style servers do not echo the stop string: when the turn stopped inside an open code block
   (`count(code_end) + 1 == count(code_begin)`, NeMo-Skills' test, or a vLLM/SGLang `stop_reason` naming the
   tag) `code_end` is re-appended. Unlike NeMo-Skills we never re-append after a `length` stop: code cut off
   by the budget is not run;
3. if the turn ends with a complete code block, the LAST block (text after the last `code_begin`) is run in
   the sandbox, in one ipython session per solution so state carries over between its cells, and the
   output is appended as `code_output_begin + stdout + stderr + code_output_end` (OpenMath tags:
   "\\n```output\\n" ... "```\\n") — plus NeMo-Skills' "Remaining code executions" block when
   `add_remaining_code_executions` — and generation continues;
4. it ends on EOS / a user stop phrase (no open code block), when the token budget is spent, or after
   `max_code_executions` executions: the last completion's code is never run.

The session is deleted when the solution ends or is cancelled. Cancellation (task.cancel()) closes the
current HTTP stream, so the server stops generating for it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from mathforge.solve.client import CompletionsClient
from mathforge.solve.sandbox_client import SandboxClient, new_session_id


@dataclass(frozen=True)
class CodeTags:
    code_begin: str
    code_end: str
    code_output_begin: str
    code_output_end: str
    code_output_format: str = "qwen"  # "qwen" | "llama"


# nemo_skills/prompt/code_tags/openmath.yaml (HEAD): what OpenMath-Nemotron emits and expects back
OPENMATH_CODE_TAGS = CodeTags("<tool_call>", "</tool_call>", "\n```output\n", "```\n", "qwen")
# nemo_skills/prompt/code_tags/qwen.yaml (the CodeTags dataclass defaults)
QWEN_CODE_TAGS = CodeTags("```python\n", "```\n", "```output\n", "```\n", "qwen")


@dataclass
class CodeExecutionConfig:
    """NeMo-Skills' `CodeExecutionConfig`, same fields and defaults."""

    max_code_executions: int = 8
    code_execution_timeout: float = 10.0
    max_code_output_characters: int = 1000
    code_execution_language: str = "ipython"
    code_execution_headers: list[str] = field(default_factory=list)
    sandbox_traceback_verbosity: str = "plain"
    add_remaining_code_executions: bool = False


@dataclass
class Sampling:
    """Per-request sampling; extras (top_k, min_p, repetition_penalty) are sent only when set."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_phrases: tuple[str, ...] = ()
    extra_body: dict | None = None


@dataclass
class Generation:
    """One solution, filled in while it is produced (readable even after cancellation)."""

    generation: str = ""
    num_generated_tokens: int = 0
    code_rounds_executed: int = 0
    num_code_timeouts: int = 0
    code_execution_time: float = 0.0
    generation_time: float = 0.0
    llm_calls: int = 0
    finish_reason: str | None = None  # the last completion's: "stop" | "length"; or "error"
    completed: bool = False  # the loop ran to its end (not cancelled, no error)
    error: str | None = None
    session_id: str | None = None
    _start: float = field(default=0.0, repr=False)


# ------------------------------------------------------------------ NeMo-Skills' helpers


REMAINING_TEMPLATE = (
    "```system\nRemaining code executions: {n}. You will not be able to call code when you run out of "
    "executions, so use it wisely. Note that you can still continue solving the problem without code "
    "after that.\n```\n"
)
OUT_OF_EXECUTIONS = (
    "```system\nYou have run out of code executions! You can no longer write or execute code. Now you should "
    "continue solving the problem by relying on your mathematical reasoning and analytical skills.\n```\n"
)


def remaining_executions_text(remaining: int | None) -> str:
    if remaining is None:
        return ""
    return REMAINING_TEMPLATE.format(n=remaining) if remaining > 0 else OUT_OF_EXECUTIONS


def format_code_output(
    execution: dict, tags: CodeTags = OPENMATH_CODE_TAGS, remaining: int | None = None
) -> str:
    """What the model sees after its code block (NeMo-Skills' `format_code_output`)."""
    stdout = execution.get("stdout") or ""
    stderr = execution.get("stderr") or ""
    extra = remaining_executions_text(remaining)
    if tags.code_output_format == "qwen":
        return f"{tags.code_output_begin}{stdout}{stderr}{tags.code_output_end}{extra}"
    if tags.code_output_format == "llama":
        out = execution.get("process_status", "")
        if stdout:
            out += f"\n[stdout]\n{stdout}[/stdout]"
        if stderr:
            out += f"\n[stderr]\n{stderr}[/stderr]"
        return f"{tags.code_output_begin}\n\n{out}{extra}{tags.code_output_end}\n\n"
    raise ValueError(f"unknown code_output_format {tags.code_output_format!r}")


def extract_code_to_execute(text: str, tags: CodeTags = OPENMATH_CODE_TAGS) -> str:
    """The last code block: text after the last `code_begin`, up to the next `code_end`."""
    return text.split(tags.code_begin)[-1].split(tags.code_end)[0]


def ends_with_code_block(output: str, tags: CodeTags) -> bool:
    """The turn ended by closing a code block that it (or the text before) opened."""
    return output.endswith(tags.code_end) and output.rfind(tags.code_begin) > output.rfind(
        tags.code_end, 0, len(output) - 1
    )


def needs_code_end(output: str, finish_reason: str | None, stop_reason: object, tags: CodeTags) -> bool:
    """Whether the server stopped on `code_end` without echoing it."""
    if finish_reason == "length" or output.endswith(tags.code_end):
        return False
    if isinstance(stop_reason, str):
        return stop_reason == tags.code_end
    return output.count(tags.code_end) + 1 == output.count(tags.code_begin)


# ------------------------------------------------------------------ the loop


class CodeExecutionLoop:
    """Generate solutions that may run code: `await loop.generate(prompt, tokens_to_generate=N)`.

    `sandbox=None` means no tools: one plain completion (no `code_end` stop, nothing executed).
    """

    def __init__(
        self,
        client: CompletionsClient,
        sandbox: SandboxClient | None = None,
        *,
        tags: CodeTags = OPENMATH_CODE_TAGS,
        config: CodeExecutionConfig | None = None,
    ) -> None:
        self.client = client
        self.sandbox = sandbox
        self.tags = tags
        self.config = config or CodeExecutionConfig()

    async def stream(
        self,
        prompt: str,
        *,
        tokens_to_generate: int,
        sampling: Sampling | None = None,
        record: Generation | None = None,
        max_code_executions: int | None = None,
    ) -> AsyncIterator[str]:
        """Yield the solution's text as it is produced: model chunks, re-added `code_end`, code outputs.

        Close it with `contextlib.aclosing` (or cancel the consuming task) to stop early. `record` is
        updated as it goes; `max_code_executions` overrides the config's, as NeMo-Skills' request arg does.
        """
        sampling = sampling or Sampling()
        rec = record if record is not None else Generation()
        cfg, tags = self.config, self.tags
        tools = self.sandbox is not None
        max_exec = cfg.max_code_executions if max_code_executions is None else max_code_executions
        if not tools:
            max_exec = 0
        stop = list(sampling.stop_phrases) + ([tags.code_end] if tools else [])
        use_session = tools and cfg.code_execution_language == "ipython"
        rec.session_id = new_session_id() if use_session else None
        remaining = int(tokens_to_generate)
        session_opened = False
        rec._start = time.monotonic()
        try:
            for round_index in range(max_exec + 1):
                if remaining <= 0:
                    break
                async with self.client.stream(
                    prompt + rec.generation,
                    max_tokens=remaining,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=sampling.seed,
                    stop=stop,
                    top_k=sampling.top_k,
                    min_p=sampling.min_p,
                    repetition_penalty=sampling.repetition_penalty,
                    extra_body=sampling.extra_body,
                ) as completion:
                    rec.llm_calls += 1
                    try:
                        async for chunk in completion:
                            if chunk.text:
                                rec.generation += chunk.text
                                yield chunk.text
                    except BaseException:  # cancelled or broken mid-turn: count what streamed (1/chunk)
                        rec.num_generated_tokens += completion.num_generated_tokens
                        raise
                rec.generation_time = time.monotonic() - rec._start
                output = completion.text
                rec.finish_reason = completion.finish_reason
                n = completion.num_generated_tokens
                rec.num_generated_tokens += n
                remaining -= n
                if tools and needs_code_end(output, completion.finish_reason, completion.stop_reason, tags):
                    output += tags.code_end
                    rec.generation += tags.code_end
                    yield tags.code_end
                if not output or round_index == max_exec or remaining <= 0:
                    break
                if not ends_with_code_block(output, tags):
                    break  # EOS or a user stop phrase: the solution is finished
                code = "\n".join(cfg.code_execution_headers) + extract_code_to_execute(output, tags)
                started = time.monotonic()
                session_opened = True
                result = await self.sandbox.execute(
                    code,
                    session_id=rec.session_id,
                    language=cfg.code_execution_language,
                    timeout=cfg.code_execution_timeout,
                    max_output_characters=cfg.max_code_output_characters,
                    traceback_verbosity=cfg.sandbox_traceback_verbosity,
                )
                rec.code_execution_time += time.monotonic() - started
                left = (max_exec - round_index - 1) if cfg.add_remaining_code_executions else None
                formatted = format_code_output(result, tags, left)
                rec.generation += formatted
                if result.get("process_status") == "timeout":
                    rec.num_code_timeouts += 1
                rec.code_rounds_executed += 1
                yield formatted
            rec.completed = True
        finally:
            rec.generation_time = time.monotonic() - rec._start
            if rec.session_id is not None and session_opened:
                # best effort, bounded: a dead sandbox must not hold up cancellation
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.sandbox.delete_session(rec.session_id), timeout=5.0)

    async def generate(
        self,
        prompt: str,
        *,
        tokens_to_generate: int,
        sampling: Sampling | None = None,
        record: Generation | None = None,
        max_code_executions: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Run one solution to its end; returns the filled `Generation` (exceptions propagate)."""
        rec = record if record is not None else Generation()
        async with aclosing(
            self.stream(
                prompt,
                tokens_to_generate=tokens_to_generate,
                sampling=sampling,
                record=rec,
                max_code_executions=max_code_executions,
            )
        ) as pieces:
            async for piece in pieces:
                if on_text is not None:
                    on_text(piece)
        return rec
