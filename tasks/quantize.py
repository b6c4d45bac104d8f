"""Quantised checkpoint artifacts (torch backend): FP8 with per-tensor static scales in the ModelOpt/HF
layout, and int8 weight-only (W8A16) with per-channel scales."""

from __future__ import annotations

from pathlib import Path

from artifacts import ArtifactRef
from artifacts.store import default_store
from artifacts.task import artifact_task
from mathforge.progress import Progress


@artifact_task(kind="fp8-checkpoint", version=1, name="quantize-fp8")
def quantize_fp8(
    checkpoint: ArtifactRef, calibration: ArtifactRef, num_samples: int, max_seq_len: int, out: Path
) -> None:
    from mathforge.quantize import calibrate_fp8

    store = default_store()
    with Progress("FP8 calibration", total=num_samples) as progress:
        calibrate_fp8(
            store.path(checkpoint),
            store.path(calibration) / "data" / "calibration.parquet",
            out,
            num_samples=num_samples,
            max_seq_len=max_seq_len,
            progress=progress,
        )


@artifact_task(kind="int8-checkpoint", version=1, name="quantize-int8")
def quantize_int8(checkpoint: ArtifactRef, out: Path) -> dict:
    """int8 weight-only (W8A16, per-output-channel scales): no calibration data, so the key is the
    checkpoint alone. Returns the writer's summary (Linears quantised, bytes, worst weight error)."""
    from mathforge.engine.int8 import quantize_int8_checkpoint

    return quantize_int8_checkpoint(default_store().path(checkpoint), out)
