"""Evaluate a variant: serve it, start the code sandbox, solve the problem set, grade, log to MLflow."""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import task

from artifacts import ArtifactRef
from artifacts.store import default_store
from mathforge import paths, tracking
from mathforge.config import EngineSettings, EvaluateSettings
from mathforge.engine.build import load_engine
from mathforge.progress import Progress
from mathforge.serving import ServerProcess, free_port, mathforge_argv
from tasks.serve import serve_variant

# what each variant's MLflow run gets: the same names for every variant
EVAL_METRICS = (
    "accuracy",
    "pass_at_k",
    "maj_at_k",
    "mean_tokens",
    "time_per_problem_s",
    "code_executions_mean",
    "code_timeouts",
    "num_problems",
    "num_samples",
    "no_answer",
)


def sandbox_process(tag: str) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        mathforge_argv("sandbox", "--host", "127.0.0.1", "--port", str(port)),
        health_url=f"http://127.0.0.1:{port}/health",
        log_file=paths.runs_dir() / "logs" / f"sandbox-{tag}-{port}.log",
        name="mathforge sandbox",
    )


@task(name="evaluate")
def evaluate_variant(
    variant: str,
    engine: ArtifactRef,
    engine_settings: EngineSettings,
    settings: EvaluateSettings,
    run_name: str,
    child_run_id: str | None = None,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from mathforge.data.problems import load_problems
    from mathforge.data.prompts import render_chat
    from mathforge.solve import evaluate_problems

    store = default_store()
    weights = store.resolve(ArtifactRef(**load_engine(store.path(engine))["weights"]))
    tokenizer = AutoTokenizer.from_pretrained(store.path(weights))
    problems = load_problems(settings.problems, split=settings.split)[: settings.num_problems]
    prompts = [render_chat(tokenizer, p.problem, tools=settings.tools) for p in problems]
    out = paths.runs_dir() / run_name / f"eval-{variant}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)

    with serve_variant(variant, engine, engine_settings) as served:
        sandbox = sandbox_process(variant) if settings.tools else None
        with (
            sandbox or contextlib.nullcontext(),
            Progress(f"evaluate {variant}", total=len(problems)) as progress,
        ):
            metrics = evaluate_problems(
                served.base_url,
                served.model,
                problems,
                prompts,
                sandbox_url=sandbox.health_url.rsplit("/", 1)[0] if sandbox else None,
                samples=settings.samples,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed,
                tokens_to_generate=settings.tokens_to_generate,
                max_code_executions=settings.max_code_executions,
                code_execution_timeout=settings.code_execution_timeout,
                stop_after_n_completed=settings.stop_after_n_completed,
                stop_after_n_seconds=settings.stop_after_n_seconds,
                stop_after_n_same_answer=settings.stop_after_n_same_answer,
                time_budget_s=settings.time_budget_s,
                concurrent_problems=settings.concurrent_problems,
                out_jsonl=out,
                progress=progress,
            )
    headline = {k: float(metrics[k]) for k in EVAL_METRICS if metrics.get(k) is not None}
    if child_run_id:
        tracking.log_metrics(child_run_id, headline)
        tracking.log_artifact(child_run_id, out, "evaluate")
    return {"variant": variant, "metrics": headline, "results_file": str(out)}
