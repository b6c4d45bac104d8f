"""Evaluate engine variants on a problem set: tool-integrated solving through the code sandbox, graded."""

from __future__ import annotations

import time

from prefect import flow
from prefect.runtime import flow_run

from artifacts import ArtifactRef
from artifacts.store import default_store
from flows.build_engines import build_engines
from mathforge.config import Variant, load_preset
from mathforge.engine.build import load_engine
from tasks.evaluate import evaluate_variant
from tasks.track import compare, open_variant_run, start_tracking


@flow(name="evaluate")
def evaluate(
    preset: str = "tiny",
    variants: list[Variant] | None = None,
    split: str | None = None,
    samples: int | None = None,
    tools: bool | None = None,
    engines: dict[str, ArtifactRef] | None = None,
    variant_runs: dict[str, str] | None = None,
    run_name: str | None = None,
) -> dict[str, dict[str, float]]:
    """Standalone it opens its own MLflow runs; inside `pipeline` it logs into the variants' runs."""
    cfg = load_preset(preset)
    overrides = {"split": split, "samples": samples, "tools": tools}
    settings = cfg.evaluate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    engines = engines or build_engines.fn(preset, variants)
    run_name = run_name or f"{cfg.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}"
    standalone = variant_runs is None
    if standalone:
        store = default_store()
        parent = start_tracking(cfg.experiment, f"{cfg.name}-evaluate", flow_run.get_id())
        variant_runs = {
            v: open_variant_run(parent, v, ref, load_engine(store.path(store.resolve(ref))))
            for v, ref in engines.items()
        }
    results = {
        v: evaluate_variant(v, ref, cfg.engine, settings, run_name, variant_runs[v])["metrics"]
        for v, ref in engines.items()
    }
    if standalone:
        rows = [{"variant": v, "run_id": variant_runs[v], "metrics": m} for v, m in results.items()]
        compare(cfg.experiment, parent, rows, [])
    return results
