"""Train the embedded tiny model: sandbox-run synthetic data, a Qwen2-architecture model, an HF checkpoint.

Importable and runnable without Prefect or MLflow (`python -m mathforge.train --help`):

    python -m mathforge.train data --out DATA --num-train 120000          # problems run in `mathforge sandbox`
    python -m mathforge.train fit --data DATA --out CKPT --loss-log loss.jsonl --steps 3000
    python -m mathforge.train log-mlflow --loss-log loss.jsonl             # a finished run's curves into MLflow

`fit_from_files` is what the Prefect task (tasks/train.py) and the CLI both call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mathforge.train.trainer import TrainConfig, train

DEFAULT_SKELETON = Path(__file__).resolve().parents[1] / "data" / "tiny_model"

__all__ = ["DEFAULT_SKELETON", "TrainConfig", "fit_from_files", "train", "validation_records"]


def validation_records(source: str = "tiny", split: str = "validation") -> list[dict]:
    """The shipped validation split (never in a training set) as records."""
    from mathforge.data.problems import load_problems

    return [
        {"problem": p.problem, "reference_solution": p.reference_solution}
        for p in load_problems(source, split=split)
        if p.reference_solution
    ]


def fit_from_files(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    skeleton: str | Path = DEFAULT_SKELETON,
    device: str = "auto",
    loss_log: str | Path | None = None,
    on_record: Callable[[dict], None] | None = None,
    max_train: int | None = None,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Encode the data set (train.jsonl.gz) and the shipped validation split, train, write the checkpoint."""
    import time

    from mathforge.train.data import encode_records, read_records

    started = time.monotonic()
    records = read_records(data)[:max_train]
    train_examples = encode_records(
        skeleton,
        records,
        generic_prompt_fraction=cfg.generic_prompt_fraction,
        seed=cfg.seed,
        max_len=cfg.max_len,
    )
    # validation: always the tool prompt (what `mathforge evaluate` uses by default)
    val_examples = encode_records(skeleton, validation_records(), generic_prompt_fraction=0.0, seed=0)
    encode_s = round(time.monotonic() - started, 2)
    return train(
        train_examples,
        val_examples,
        skeleton,
        out,
        cfg,
        device=device,
        loss_log=loss_log,
        on_record=on_record,
        time_budget_s=time_budget_s,
        extra_start={
            "data": str(data),
            "encode_s": encode_s,
            "dropped_too_long": len(records) - len(train_examples),
        },
    )
