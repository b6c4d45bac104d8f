"""Benchmark a variant through its OpenAI API, exactly as any other server would be measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from artifacts import ArtifactRef
from artifacts.store import default_store
from mathforge import paths
from mathforge.config import BenchSettings, EngineSettings
from mathforge.engine.build import load_engine
from tasks.serve import serve_variant


def bench_prompts(model_dir: Path, settings: BenchSettings) -> list[str]:
    """The math prompt for the benchmark problems, rendered with the model's own chat template."""
    from transformers import AutoTokenizer

    from mathforge.data.problems import load_problems
    from mathforge.data.prompts import render_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = load_problems(settings.problems, split=settings.split)
    return [render_chat(tokenizer, p.problem, tools=False) for p in problems]


@task(name="benchmark")
def benchmark(
    variant: str, engine: ArtifactRef, engine_settings: EngineSettings, settings: BenchSettings, run_name: str
) -> dict[str, Any]:
    from mathforge.bench.run import run_benchmark_sync

    store = default_store()
    weights = store.resolve(ArtifactRef(**load_engine(store.path(engine))["weights"]))
    prompts = bench_prompts(store.path(weights), settings)
    with serve_variant(variant, engine, engine_settings) as served:
        results = run_benchmark_sync(
            served.base_url,
            served.model,
            prompts,
            concurrency_levels=settings.concurrency,
            num_prompts=settings.num_prompts,
            max_tokens=settings.max_tokens,
            warmup=settings.warmup,
        )
    out = paths.runs_dir() / run_name / f"bench-{variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return {"variant": variant, "results": results, "results_file": str(out)}
