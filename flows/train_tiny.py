"""Train the embedded tiny model: synthetic data (run in the sandbox) -> Qwen2 checkpoint, curves in MLflow.

Deployed on the `gpu` work pool (`train-tiny/gpu`); runs on CPU too (`device="cpu"`, few steps, for tests).
Both stages are content-addressed artifacts: re-running the same recipe costs nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from mathforge import tracking
from mathforge.data.problem_gen import TRAIN_SEED
from mathforge.train import DEFAULT_SKELETON
from mathforge.train.data import generator_fingerprint
from mathforge.train.trainer import SKELETON_FILES, TrainConfig
from tasks.train import start_train_run, train_model, training_data


@flow(name="train-tiny")
def train_tiny(
    num_train: int = 100_000,
    data_seed: int = TRAIN_SEED,
    steps: int = TrainConfig.steps,
    batch_size: int = TrainConfig.batch_size,
    lr: float = TrainConfig.lr,
    seed: int = TrainConfig.seed,
    eval_every: int = TrainConfig.eval_every,
    model_overrides: dict[str, Any] | None = None,
    skeleton: str | None = None,
    device: str = "auto",
    experiment: str = "mathforge-train-tiny",
    ship_to: str | None = None,
) -> dict[str, Any]:
    """The defaults are the shipped model's recipe. `skeleton`: config + tokenizer to start from (default: the
    shipped tiny model's). `ship_to`: a directory to copy the trained checkpoint's files into (e.g.
    mathforge/data/tiny_model)."""
    skeleton = skeleton or str(DEFAULT_SKELETON)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        model_overrides=dict(model_overrides or {}),
    )
    data = training_data(num_train, data_seed, generator_fingerprint())
    tags = {"data.digest": data.digest}
    run_id_prefect = flow_run.get_id()
    if run_id_prefect:
        tags["prefect.flow_run_id"] = run_id_prefect
    run_id = start_train_run(experiment, f"train-tiny-{steps}steps", tags)
    try:
        result = train_model(data, cfg.__dict__, skeleton, device, run_id)
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.finish_run(run_id)
    if ship_to:
        dest = Path(ship_to)
        dest.mkdir(parents=True, exist_ok=True)
        for name in (*SKELETON_FILES, "model.safetensors"):
            shutil.copyfile(Path(result["model_dir"]) / name, dest / name)
    return {**result, "data": data.model_dump(), "mlflow_run_id": run_id, "experiment": experiment}
