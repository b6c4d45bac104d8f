"""The whole pipeline: build the variants (cached artifacts), serve and benchmark each, evaluate, compare."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.benchmark_engines import benchmark_engines
from flows.build_engines import build_engines
from flows.evaluate import evaluate
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

    measured = benchmark_engines(preset, engines, parent_run_id, run_name, compare_variants=False)
    rows = measured["rows"]
    if evaluation:
        runs = {row["variant"]: row["run_id"] for row in rows}
        accuracy = evaluate(preset, engines=engines, variant_runs=runs, run_name=run_name)
        for row in rows:
            row["metrics"].update(accuracy[row["variant"]])
    url = compare(cfg.experiment, parent_run_id, rows, measured["benches"])
    return {
        "engines": {v: ref.model_dump() for v, ref in engines.items()},
        "metrics": {row["variant"]: row["metrics"] for row in rows},
        "mlflow_parent_run_id": parent_run_id,
        "mlflow_compare_url": url,
        "artifact_stage_s": round(artifact_seconds, 2),
    }
