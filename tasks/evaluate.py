"""Evaluate a served variant: solve the problem set (code through the sandbox), grade, log to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from mathforge import paths, tracking
from mathforge.config import EvaluateSettings
from mathforge.progress import Progress
from mathforge.serving import ServerProcess, free_port, mathforge_argv
from mathforge.solve.evaluate import METRIC_NAMES
from tasks.serve import Served

# what each variant's MLflow run gets: the same names for every variant
EVAL_METRICS = (*METRIC_NAMES, "no_answer")


def sandbox_process() -> ServerProcess:
    """`mathforge sandbox` on a free loopback port; its base URL is `health_url` minus `/health`."""
    port = free_port()
    return ServerProcess(
        mathforge_argv("sandbox", "--host", "127.0.0.1", "--port", str(port)),
        health_url=f"http://127.0.0.1:{port}/health",
        log_file=paths.runs_dir() / "logs" / f"sandbox-{port}.log",
        name="mathforge sandbox",
    )


@task(cache_policy=NO_CACHE, name="evaluate")
def evaluate_served(
    served: Served,
    variant: str,
    tokenizer_dir: Path,
    settings: EvaluateSettings,
    sandbox_url: str | None,
    run_name: str,
    run_id: str | None,
) -> dict[str, float]:
    from transformers import AutoTokenizer

    from mathforge.data.problems import load_problems
    from mathforge.data.prompts import render_chat
    from mathforge.solve import evaluate_problems

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    problems = load_problems(settings.problems, split=settings.split)[: settings.num_problems]
    prompts = [render_chat(tokenizer, p.problem, tools=settings.tools) for p in problems]
    out = paths.runs_dir() / run_name / f"eval-{variant}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with Progress(f"evaluate {variant}", total=len(problems)) as progress:
        metrics: dict[str, Any] = evaluate_problems(
            served.base_url,
            served.model,
            problems,
            prompts,
            sandbox_url=sandbox_url if settings.tools else None,
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
    if run_id:
        tracking.log_metrics(run_id, headline)
        tracking.log_artifact(run_id, out, "evaluate")
    return headline
