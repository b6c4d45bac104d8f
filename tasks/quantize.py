"""The FP8 checkpoint artifact (torch backend): per-tensor static scales in the ModelOpt/HF layout."""

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
