"""Tool-integrated solving: the NeMo-Skills code-execution loop, many samples with early stopping, grading.

    from mathforge.solve import evaluate_problems
    metrics = evaluate_problems(base_url, model, problems, prompts, sandbox_url=..., samples=4, out_jsonl=...)

Modules: `client` (streaming OpenAI completions), `sandbox_client` (NeMo-Skills sandbox protocol),
`code_loop` (one solution with code execution), `sampler` (N samples, early stopping, time budget),
`grading` (extraction, equivalence, pass@k, maj@k), `evaluate` (a problem set -> JSONL + metrics).
"""

from __future__ import annotations

import importlib

# name -> module; imported on first use so `mathforge --help` (which imports mathforge.solve.cli) stays fast
_EXPORTS = {
    "CompletionError": "client",
    "CompletionsClient": "client",
    "OPENMATH_CODE_TAGS": "code_loop",
    "CodeExecutionConfig": "code_loop",
    "CodeExecutionLoop": "code_loop",
    "CodeTags": "code_loop",
    "Generation": "code_loop",
    "Sampling": "code_loop",
    "METRIC_NAMES": "evaluate",
    "evaluate_problems": "evaluate",
    "evaluate_problems_async": "evaluate",
    "extract_answer": "grading",
    "majority_at_k": "grading",
    "math_equal": "grading",
    "pass_at_k": "grading",
    "EarlyStopping": "sampler",
    "ProblemResult": "sampler",
    "SampleResult": "sampler",
    "TimeBudget": "sampler",
    "solve_problem": "sampler",
    "SandboxClient": "sandbox_client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
