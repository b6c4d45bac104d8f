"""The calibration artifact: a parquet with one `text` column, rendered with the model's chat template."""

from __future__ import annotations

import json
from pathlib import Path

from artifacts import ArtifactRef
from artifacts.store import default_store
from artifacts.task import artifact_task
from mathforge.data.calibration import FORMAT_VERSION
from tasks.sources import SourceSpec


@artifact_task(kind="calibration", version=FORMAT_VERSION, name="calibration")
def calibration(
    checkpoint: ArtifactRef,
    source: SourceSpec,
    num_samples: int,
    seed: int,
    split: str | None,
    text_field: str | None,
    out: Path,
) -> None:
    """Depends on the checkpoint too: the text is rendered with its tokenizer's chat template.

    The parquet sits alone in `data/` (manifest and summary beside it), so `data/` is a directory that
    `datasets.load_dataset(dir)` and TensorRT-LLM's `quantize.py --calib_dataset` read as-is.
    """
    from mathforge.data.calibration import build_calibration

    summary = build_calibration(
        source.locator,
        default_store().path(checkpoint),
        out / "data",
        num_samples=num_samples,
        seed=seed,
        split=split,
        text_field=text_field,
        revision=source.revision,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
