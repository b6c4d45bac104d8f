"""Loss curves into MLflow: live from a running training (`MlflowRecorder`) or from a finished run's loss log
(`import_loss_log`, for a run made where MLflow is not installed, e.g. a GPU host reached through a device
tool: `python -m mathforge.train log-mlflow --loss-log loss.jsonl`).

Both turn the same loss-log records into the same MLflow entries: the `start` record's settings as params
(`train.*`), each step's numeric fields as per-step metrics (`loss`, `lr`, `grad_norm`, `tokens`, ...), `eval`
records' `val_*` metrics at their step, and the `end` record's summary (`final_loss`, `train_time_s`,
`weights_bytes`, ...) as metrics at the last step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mathforge import tracking

SKIP = {"step", "event", "elapsed_s"}


def _numeric(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in SKIP and isinstance(v, int | float) and not isinstance(v, bool)
    }


def params_of(start: dict) -> dict[str, str]:
    """Flat `train.*` params from a `start` record."""
    out = {}
    for key, value in start.items():
        if key == "event":
            continue
        if key == "config" and isinstance(value, dict):
            for k, v in value.items():
                out[f"train.{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)
        else:
            out[f"train.{key}"] = str(value)
    return out


class MlflowRecorder:
    """`on_record` callback for `mathforge.train.trainer.train`: buffers metrics, sends them in batches."""

    def __init__(self, run_id: str, flush_every: int = 200):
        from mlflow.entities import Metric, Param

        self.run_id = run_id
        self.flush_every = flush_every
        self._metric, self._param = Metric, Param
        self._buffer: list[Any] = []
        self._last_step = 0
        self._client = tracking._client()
        self.logged = 0  # metric values sent so far

    def __call__(self, record: dict) -> None:
        now = int(time.time() * 1000)
        event = record.get("event")
        if event == "start":
            params = [self._param(k, v[:6000]) for k, v in params_of(record).items()]
            for i in range(0, len(params), 100):
                self._client.log_batch(self.run_id, params=params[i : i + 100])
            return
        step = int(record.get("step", self._last_step))
        self._last_step = step
        values = _numeric(record)
        if event == "end":  # its val_* repeat the last eval record's
            values = {k: v for k, v in values.items() if not k.startswith("val_")}
        for key, value in values.items():
            self._buffer.append(self._metric(key, value, now, step))
        if event in ("eval", "end") or len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 900):
            self._client.log_batch(self.run_id, metrics=self._buffer[i : i + 900])
        self.logged += len(self._buffer)
        self._buffer.clear()


def log_records(run_id: str, records: Iterable[dict]) -> int:
    """Send loss-log records to an existing run; returns how many metric values were logged."""
    rec = MlflowRecorder(run_id)
    for r in records:
        rec(r)
    rec.flush()
    return rec.logged


def import_loss_log(
    loss_log: str | Path,
    *,
    experiment: str = "mathforge-train-tiny",
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    artifacts: Iterable[str | Path] = (),
) -> str:
    """A new finished MLflow run holding a loss log's curves (and the log itself as an artifact)."""
    from mathforge.train.trainer import read_loss_log

    path = Path(loss_log)
    records = read_loss_log(path)
    if not records or records[0].get("event") != "start":
        raise ValueError(f"{path} is not a mathforge training loss log (no start record)")
    client = tracking._client()
    run = client.create_run(
        tracking.experiment_id(experiment),
        run_name=run_name or path.stem,
        tags={
            "git.sha": tracking.git_sha(),
            "mathforge.role": "train",
            "mathforge.imported_from": str(path),
            **(tags or {}),
        },
    )
    run_id = run.info.run_id
    log_records(run_id, records)
    client.log_artifact(run_id, str(path), artifact_path="train")
    for extra in artifacts:
        client.log_artifact(run_id, str(extra), artifact_path="train")
    finished = records[-1].get("event") == "end"
    client.set_terminated(run_id, status="FINISHED" if finished else "FAILED")
    return run_id
