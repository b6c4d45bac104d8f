"""The whole pipeline: build the variants (cached artifacts); serve each once to benchmark and evaluate it;
compare them."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.build_engines import build_engines
from flows.measure import measure_variants
from mathforge.config import Variant, load_preset
from tasks.track import compare, start_tracking


@flow(name="pipeline")
def pipeline(
    preset: str = "tiny", variants: list[Variant] | None = None, evaluation: bool = True
) -> dict[str, Any]:
    cfg = load_preset(preset)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent_run_id = start_tracking(cfg.experiment, cfg.name, flow_run.get_id())

    # the build stage runs inline (its tasks appear in this run, `Cached` when hit) rather than as a subflow,
    # whose bookkeeping alone would cost as much as a fully cached build stage
    started = time.monotonic()
    engines = build_engines.fn(preset, variants)
    artifact_seconds = time.monotonic() - started

    rows, benches = measure_variants(
        cfg, engines, parent_run_id, run_name, evaluation=cfg.evaluate if evaluation else None
    )
    url = compare(cfg.experiment, parent_run_id, rows, benches)
    return {
        "engines": {v: ref.model_dump() for v, ref in engines.items()},
        "metrics": {row["variant"]: row["metrics"] for row in rows},
        "mlflow_parent_run_id": parent_run_id,
        "mlflow_compare_url": url,
        "artifact_stage_s": round(artifact_seconds, 2),
    }
