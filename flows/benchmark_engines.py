"""Serve each engine variant in turn, benchmark it over HTTP, record it in MLflow, compare the variants."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from artifacts import ArtifactRef
from flows.build_engines import build_engines
from flows.measure import measure_variants
from mathforge.config import load_preset
from tasks.track import compare, start_tracking


@flow(name="benchmark-engines")
def benchmark_engines(preset: str = "tiny", engines: dict[str, ArtifactRef] | None = None) -> dict[str, Any]:
    cfg = load_preset(preset)
    engines = engines or build_engines.fn(preset)  # reuse (or build) the preset's engines
    parent_run_id = start_tracking(cfg.experiment, f"{cfg.name}-benchmark", flow_run.get_id())
    rows, benches = measure_variants(
        cfg, engines, parent_run_id, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    url = compare(cfg.experiment, parent_run_id, rows, benches)
    return {"metrics": {r["variant"]: r["metrics"] for r in rows}, "mlflow_compare_url": url}
