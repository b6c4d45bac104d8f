"""Serve each engine variant in turn, benchmark it over HTTP, record it in MLflow, compare the variants."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from artifacts import ArtifactRef
from artifacts.store import default_store
from flows.build_engines import build_engines
from mathforge.config import load_preset
from mathforge.engine.build import load_engine
from tasks.bench import benchmark
from tasks.track import compare, log_benchmark, open_variant_run, start_tracking


@flow(name="benchmark-engines")
def benchmark_engines(
    preset: str = "tiny",
    engines: dict[str, ArtifactRef] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    compare_variants: bool = True,
) -> dict[str, Any]:
    cfg = load_preset(preset)
    engines = engines or build_engines.fn(preset)  # standalone: reuse (or build) the preset's engines
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent_run_id = parent_run_id or start_tracking(cfg.experiment, cfg.name, flow_run.get_id())
    store = default_store()
    rows, benches = [], []
    for variant, engine in engines.items():  # one at a time: variants must not compete for the machine
        spec = load_engine(store.path(store.resolve(engine)))
        run_id = open_variant_run(parent_run_id, variant, engine, spec)
        bench = benchmark(variant, engine, cfg.engine, cfg.bench, run_name)
        rows.append({"variant": variant, "run_id": run_id, "metrics": log_benchmark(run_id, bench)})
        benches.append(bench)
    url = compare(cfg.experiment, parent_run_id, rows, benches) if compare_variants else None
    return {
        "rows": rows,
        "benches": benches,
        "mlflow_parent_run_id": parent_run_id,
        "mlflow_compare_url": url,
    }
