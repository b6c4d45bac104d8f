"""The trained ReDrafter drafter artifact: base checkpoint + data fingerprint + hyper-parameters -> drafter.

Its recipe key holds the base checkpoint's content digest, the data's fingerprint (`resolve_drafter_data`:
the generator version for `tiny`, a local file's sha256, a hub dataset's resolved commit; never a path) and
the training settings (those that change what is trained: `DrafterSettings` leaves decoding-only and
location fields out of its dump). Changing the data rebuilds the drafter and what depends on it, nothing else.

The training curves go to MLflow, into a run named `drafter`: nested under the pipeline's parent run when one
is open for this Prefect flow run (found by its `prefect.flow_run_id` tag), else in the experiment that
`drafter_tracking(...)` names (the CLI names the preset's), else `$MLFLOW_EXPERIMENT_NAME` or
`mathforge-drafter`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from artifacts import ArtifactRef
from artifacts.store import default_store
from artifacts.task import artifact_task
from mathforge.config import DrafterSettings
from tasks.sources import SourceSpec

DEFAULT_EXPERIMENT = "mathforge-drafter"
RUN_NAME = "drafter"
_TRACKING: contextvars.ContextVar[dict[str, str | None] | None] = contextvars.ContextVar(
    "drafter_tracking", default=None
)


@contextlib.contextmanager
def drafter_tracking(experiment: str | None = None, parent_run_id: str | None = None) -> Iterator[None]:
    """Where `train_drafter` logs (tracking only: never part of the recipe key)."""
    token = _TRACKING.set({"experiment": experiment, "parent_run_id": parent_run_id})
    try:
        yield
    finally:
        _TRACKING.reset(token)


def resolve_data(settings: DrafterSettings) -> SourceSpec:
    """`resolve_drafter_data` without Prefect."""
    from mathforge.drafter.data import fingerprint

    fp = fingerprint(settings)
    locator = settings.data_source
    if fp["train"]["kind"] == "file":
        locator = str(Path(locator).expanduser().resolve())
    return SourceSpec(fingerprint=fp, locator=locator, revision=fp["train"].get("commit"))


@task(name="resolve-drafter-data", cache_policy=NO_CACHE)
def resolve_drafter_data(settings: DrafterSettings) -> SourceSpec:
    """The drafter data's fingerprint (in the key) and where to read it (not in the key). Never cached: it
    is how a change of the data is noticed."""
    return resolve_data(settings)


def _pipeline_parent(client: Any) -> Any | None:
    """The pipeline's MLflow parent run of the current Prefect flow run, if one is open."""
    try:
        from prefect.runtime import flow_run

        flow_run_id = flow_run.get_id()
    except Exception:  # no Prefect context
        return None
    if not flow_run_id:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`mathforge.role` = 'pipeline'",
        max_results=1,
    )
    return runs[0] if runs else None


def open_drafter_run(tags: dict[str, str]) -> str:
    """Create the MLflow run the training logs into (see the module docstring for where it goes)."""
    from mathforge import tracking

    client = tracking._client()
    target = _TRACKING.get() or {}
    parent_id = target.get("parent_run_id")
    parent = client.get_run(parent_id) if parent_id else _pipeline_parent(client)
    run_tags = {"git.sha": tracking.git_sha(), "mathforge.role": "drafter", **tags}
    if parent is not None:
        experiment_id = parent.info.experiment_id
        run_tags["mlflow.parentRunId"] = parent.info.run_id
    else:
        name = target.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment_id = tracking.experiment_id(name)
    return client.create_run(experiment_id, run_name=RUN_NAME, tags=run_tags).info.run_id


@artifact_task(kind="drafter", version=1, name="train-drafter")
def train_drafter(checkpoint: ArtifactRef, data: SourceSpec, settings: DrafterSettings, out: Path) -> None:
    """Train the drafter on the frozen base (mathforge.drafter.train) into `out`: Apple's layout
    (config.json + one bf16 model.safetensors), training_summary.json (held-out metrics), loss.jsonl."""
    from mathforge import tracking
    from mathforge.drafter.data import fingerprint
    from mathforge.drafter.train import LOSS_LOG, SUMMARY_FILE
    from mathforge.drafter.train import train_drafter as train
    from mathforge.train.mlflow_log import MlflowRecorder

    if (
        data.fingerprint["train"]["kind"] != "hub"
        and fingerprint(settings)["train"] != data.fingerprint["train"]
    ):
        raise RuntimeError("the drafter's training data changed since it was resolved; re-run to pick it up")
    run_id = open_drafter_run({"checkpoint.digest": checkpoint.digest})
    recorder = MlflowRecorder(run_id)
    status = "FAILED"
    try:
        train(
            default_store().path(checkpoint),
            out,
            settings,
            locator=data.locator,
            commit=data.revision,
            on_record=recorder,
        )
        recorder.flush()
        tracking.log_artifact(run_id, out / SUMMARY_FILE, "drafter")
        tracking.log_artifact(run_id, out / LOSS_LOG, "drafter")
        status = "FINISHED"
    finally:
        recorder.flush()
        tracking.finish_run(run_id, status)
