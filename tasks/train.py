"""Training the tiny model: the data set and the trained checkpoint are artifacts; curves go to MLflow."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task

from artifacts import ArtifactRef
from artifacts.keys import content_digest
from artifacts.store import default_store
from artifacts.task import artifact_task
from mathforge import tracking
from mathforge.train.data import FORMAT_VERSION

CHECKPOINT_KIND = "tiny-checkpoint"
CHECKPOINT_VERSION = 1


@artifact_task(kind="tiny-train-data", version=FORMAT_VERSION, name="training-data")
def training_data(num_train: int, seed: int, generator: str, out: Path) -> None:
    """`generator` (the generator's fingerprint) is only in the key: a changed family rebuilds the data."""
    from mathforge.train.data import build_training_data

    build_training_data(out, num_train, seed)


@task(name="start-train-run")
def start_train_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    return tracking.start_parent_run(experiment, run_name, {"mathforge.role": "train", **tags})


@task(name="train-model")
def train_model(
    data: ArtifactRef, config: dict[str, Any], skeleton: str, device: str, run_id: str | None
) -> dict[str, Any]:
    """Train (or reuse the checkpoint of the same recipe); the run gets the curves either way."""
    from mathforge.train import fit_from_files
    from mathforge.train.data import TRAIN_FILE
    from mathforge.train.mlflow_log import MlflowRecorder, log_records
    from mathforge.train.trainer import SKELETON_FILES, TrainConfig, read_loss_log

    cfg = TrainConfig(**config)
    store = default_store()
    skeleton_dir = Path(skeleton)
    params = {"config": asdict(cfg), "skeleton": _files_digest(skeleton_dir, SKELETON_FILES)}
    built = []

    def build(out: Path) -> dict[str, Any]:
        recorder = MlflowRecorder(run_id) if run_id else None
        summary = fit_from_files(
            store.path(data) / TRAIN_FILE,
            out / "model",
            cfg,
            skeleton=skeleton_dir,
            device=device,
            loss_log=out / "loss.jsonl",
            on_record=recorder,
        )
        if recorder is not None:
            recorder.flush()
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        built.append(True)
        return summary

    ref = store.get_or_build(CHECKPOINT_KIND, CHECKPOINT_VERSION, params, {"data": data}, build)
    root = store.path(ref)
    if run_id:
        if not built:  # a cache hit: the stored loss log gives this run its curves
            log_records(run_id, read_loss_log(root / "loss.jsonl"))
        tracking.log_artifact(run_id, root / "loss.jsonl", "train")
        tracking.log_artifact(run_id, root / "summary.json", "train")
        tracking._client().set_tag(run_id, "checkpoint.digest", ref.digest)
    return {
        "checkpoint": ref.model_dump(),
        "model_dir": str(root / "model"),
        "summary": json.loads((root / "summary.json").read_text()),
        "cached": not built,
    }


def _files_digest(directory: Path, names: tuple[str, ...]) -> str:
    """Content digest of the named files only (a skeleton's weights, if any, are not used)."""
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            (Path(tmp) / name).write_bytes((directory / name).read_bytes())
        return content_digest(tmp) if names else hashlib.sha256(b"").hexdigest()
