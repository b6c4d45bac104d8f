"""Evaluate engine variants on a problem set: tool-integrated solving through the code sandbox, graded."""

from __future__ import annotations

import time

from prefect import flow
from prefect.runtime import flow_run

from flows.build_engines import build_engines
from flows.measure import measure_variants
from mathforge.config import Variant, load_preset
from tasks.track import compare, start_tracking


@flow(name="evaluate")
def evaluate(
    preset: str = "tiny",
    variants: list[Variant] | None = None,
    split: str | None = None,
    samples: int | None = None,
    temperature: float | None = None,
    tools: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Overrides left as None keep the preset's `evaluate` settings."""
    cfg = load_preset(preset)
    overrides = {"split": split, "samples": samples, "temperature": temperature, "tools": tools}
    settings = cfg.evaluate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    engines = build_engines.fn(preset, variants)
    parent_run_id = start_tracking(cfg.experiment, f"{cfg.name}-evaluate", flow_run.get_id())
    run_name = f"{cfg.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}"
    rows, _ = measure_variants(cfg, engines, parent_run_id, run_name, bench=False, evaluation=settings)
    compare(cfg.experiment, parent_run_id, rows, [])
    return {row["variant"]: row["metrics"] for row in rows}
