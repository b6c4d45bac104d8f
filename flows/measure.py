"""Serve each variant once and measure it while it is up: benchmark, evaluate, or both.

Shared by `benchmark_engines`, `evaluate` and `pipeline`: a server start costs minutes on a real model,
so one start per variant serves every measurement the calling flow asks for.
"""

from __future__ import annotations

import contextlib
from typing import Any

from artifacts import ArtifactRef
from artifacts.store import default_store
from mathforge.config import EvaluateSettings, Preset
from mathforge.engine.build import load_engine
from tasks.bench import benchmark
from tasks.evaluate import evaluate_served, sandbox_process
from tasks.serve import serve_variant
from tasks.track import log_benchmark, open_variant_run


def measure_variants(
    cfg: Preset,
    engines: dict[str, ArtifactRef],
    parent_run_id: str,
    run_name: str,
    *,
    bench: bool = True,
    evaluation: EvaluateSettings | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (variant, MLflow run id, metrics) and raw benchmark results, one variant at a time."""
    store = default_store()
    rows, benches = [], []
    needs_sandbox = evaluation is not None and evaluation.tools
    with sandbox_process() if needs_sandbox else contextlib.nullcontext() as sandbox:
        sandbox_url = sandbox.health_url.removesuffix("/health") if sandbox else None
        for variant, engine in engines.items():  # one at a time: variants must not compete for the machine
            spec = load_engine(store.path(store.resolve(engine)))
            tokenizer_dir = store.path(store.resolve(ArtifactRef(**spec["weights"])))
            run_id = open_variant_run(parent_run_id, variant, engine, spec)
            metrics: dict[str, float] = {}
            with serve_variant(variant, engine, cfg.engine) as served:
                if bench:
                    result = benchmark(served, variant, tokenizer_dir, cfg.bench, run_name)
                    metrics |= log_benchmark(run_id, result)
                    benches.append(result)
                if evaluation is not None:
                    metrics |= evaluate_served(
                        served, variant, tokenizer_dir, evaluation, sandbox_url, run_name, run_id
                    )
            rows.append({"variant": variant, "run_id": run_id, "metrics": metrics})
    return rows, benches
