"""MLflow bookkeeping: one parent run per pipeline run, one child run per variant, same metric names for all.

Run ids are always passed explicitly: Prefect tasks may run in worker threads, and MLflow's active-run
stack is thread-local, so `nested=True` alone would silently create top-level runs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mathforge import paths

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
STAT_KEYS = ("mean", "p50", "p90", "p99")
THROUGHPUT_KEYS = ("output_tok_s", "total_tok_s", "request_s")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = paths.home() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _client():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient(tracking_uri())


def experiment_id(name: str) -> str:
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:"):  # local store: keep artifacts beside the database
        artifact_location = (paths.home() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    """Hardware and software of this host, recorded with every pipeline run (results mean nothing without)."""
    import importlib.metadata
    import platform

    import torch

    env = {
        "host.python": platform.python_version(),
        "host.machine": platform.machine(),
        "host.cpu_count": str(os.cpu_count()),
        "host.torch": torch.__version__,
    }
    for pkg in ("mathforge", "transformers", "prefect", "mlflow"):
        try:
            env[f"host.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        env["host.gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
        env["host.cuda"] = str(torch.version.cuda)
    return env


def start_parent_run(experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    client = _client()
    run = client.create_run(
        experiment_id(experiment),
        run_name=run_name,
        tags={"git.sha": git_sha(), "mathforge.role": "pipeline", **environment(), **tags},
    )
    return run.info.run_id


def start_child_run(
    parent_run_id: str, variant: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    client = _client()
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=variant,
        tags={"mlflow.parentRunId": parent_run_id, "variant": variant, "mathforge.role": "variant", **tags},
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status=status)


def flatten_level_metrics(level: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of one concurrency level, under the names every variant shares."""
    return {k: float(v) for k, v in level.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def log_benchmark(
    run_id: str, results: Mapping[str, Any], results_file: Path | None = None
) -> dict[str, float]:
    """Log each concurrency level as a step (curves in the UI); the headline is the highest level."""
    import time

    from mlflow.entities import Metric

    client = _client()
    levels = results["levels"]
    now = int(time.time() * 1000)
    batch = []
    for level in levels:
        step = int(level["concurrency"])
        for key, value in flatten_level_metrics(level["metrics"]).items():
            batch.append(Metric(key, value, now, step))
    for start in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[start : start + 900])
    if results_file is not None:
        client.log_artifact(run_id, str(results_file), artifact_path="bench")
    return flatten_level_metrics(levels[-1]["metrics"])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    client = _client()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    _client().log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    _client().log_figure(run_id, figure, artifact_file)


def compare_url(experiment: str, run_ids: Iterable[str]) -> str:
    """The MLflow UI's compare view for these runs (served by `mathforge ui` for a local store)."""
    uri = tracking_uri()
    base = (
        uri.rstrip("/")
        if uri.startswith("http")
        else os.environ.get("MATHFORGE_MLFLOW_UI", "http://127.0.0.1:5000")
    )
    runs = "[" + ",".join(f'"{r}"' for r in run_ids) + "]"
    exps = f'["{experiment_id(experiment)}"]'
    return f"{base}/#/compare-runs?runs={quote(runs)}&experiments={quote(exps)}"


def child_runs(parent_run_id: str) -> list:
    client = _client()
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
    )
