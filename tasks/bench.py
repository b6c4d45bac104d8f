"""Benchmark a served variant through its OpenAI API, exactly as any other server would be measured.

Speculative variants report their acceptance length per request (`usage.accept_len_mean`); each level's
`accept_len_mean` is the mean over its requests, logged to MLflow with the other metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from mathforge import paths
from mathforge.config import BenchSettings
from mathforge.progress import Progress
from tasks.serve import Served


def bench_prompts(model_dir: Path, settings: BenchSettings) -> list[str]:
    """The math prompt for the benchmark problems, rendered with the model's own chat template."""
    from transformers import AutoTokenizer

    from mathforge.data.problems import load_problems
    from mathforge.data.prompts import render_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = load_problems(settings.problems, split=settings.split)
    return [render_chat(tokenizer, p.problem, tools=False) for p in problems]


@task(cache_policy=NO_CACHE, name="benchmark")
def benchmark(
    served: Served, variant: str, tokenizer_dir: Path, settings: BenchSettings, run_name: str
) -> dict[str, Any]:
    from mathforge.bench.run import run_benchmark_sync

    prompts = bench_prompts(tokenizer_dir, settings)
    with Progress(f"bench {variant}", settings.num_prompts * len(settings.concurrency)) as progress:
        results = run_benchmark_sync(
            served.base_url,
            served.model,
            prompts,
            concurrency_levels=settings.concurrency,
            num_prompts=settings.num_prompts,
            max_tokens=settings.max_tokens,
            warmup=settings.warmup,
            progress=progress,
        )
    if variant.endswith("+redrafter") and not any(
        "accept_len_mean" in level["metrics"] for level in results["levels"]
    ):
        from tasks.serve import task_log

        task_log()(f"bench {variant}: the server reported no acceptance length (usage.accept_len_mean)")
    out = paths.runs_dir() / run_name / f"bench-{variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return {"variant": variant, "results": results, "results_file": str(out)}
