"""Training the tiny model: loss masks, the schedule, the CLI without Prefect, the MLflow importer, and the
`train-tiny` Prefect flow for real on CPU (real Prefect server, real sandbox, real MLflow SQLite store)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mathforge.data.problems import load_problems
from mathforge.train.data import IGNORE, encode, output_spans, read_records, write_jsonl_gz
from mathforge.train.trainer import TrainConfig, lr_at, read_loss_log

REPO = Path(__file__).resolve().parents[1]
# a 1-layer, 64-wide model of the same architecture and tokenizer: seconds on a CPU
SMALL = {
    "num_hidden_layers": 1,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _records(split: str, n: int) -> list[dict]:
    return [
        {"problem": p.problem, "reference_solution": p.reference_solution, "source": p.source}
        for p in load_problems("tiny", split=split)[:n]
    ]


def test_encode_trains_the_solution_but_not_the_prompt_or_the_code_output(tokenizer):
    rec = _records("calibration", 1)[0]
    solution = rec["reference_solution"]
    for tools in (True, False):
        e = encode(tokenizer, rec["problem"], solution, tools=tools)
        assert len(e.ids) == len(e.labels)
        trained = [t for t in e.labels if t != IGNORE]
        (start, stop) = output_spans(solution)[0]
        assert solution[start:stop].startswith("\n```output\n") and solution[start:stop].endswith("```\n")
        expected = solution[:start] + solution[stop:] + "<|im_end|>"
        assert tokenizer.decode(trained) == expected
        # the first trained token follows the opened assistant turn; the prompt is never trained
        first = e.labels.index(trained[0])
        assert tokenizer.decode(e.ids[:first]).endswith("<|im_start|>assistant\n")
        assert ("integrating natural language reasoning" in tokenizer.decode(e.ids)) is tools


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, cfg) for s in range(10, 100)]
    assert values == sorted(values, reverse=True)


def test_cli_trains_without_prefect_and_the_log_imports_into_mlflow(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """`python -m mathforge.train fit` (what the GPU run uses), then `log-mlflow` into a SQLite store."""
    data = tmp_path / "train.jsonl.gz"
    records = _records("calibration", 24)
    write_jsonl_gz(data, records)
    assert read_records(data) == records
    out, log = tmp_path / "ckpt", tmp_path / "loss.jsonl"
    args = ["--steps", "12", "--batch-size", "8", "--lr", "0.01", "--warmup-steps", "1", "--eval-every", "6"]
    models = [x for k, v in SMALL.items() for x in ("--model", f"{k}={v}")]
    proc = subprocess.run(
        [sys.executable, "-m", "mathforge.train", "fit", "--data", str(data), "--out", str(out)]
        + ["--loss-log", str(log), "--device", "cpu", *args, *models],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records_log = read_loss_log(log)
    assert records_log[0]["event"] == "start" and records_log[0]["num_train"] == 24
    steps = [r for r in records_log if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0  # it learns
    evals = [r for r in records_log if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0 <= r["val_token_acc"] <= 1 and r["val_loss"] > 0 for r in evals)
    end = records_log[-1]
    assert end["event"] == "end" and end["final_loss"] == steps[-1]["loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<|im_end|>"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()

    # what `python -m mathforge.train log-mlflow --loss-log ...` runs where MLflow is installed
    from mathforge.train.__main__ import main as train_main

    home = tmp_path / "home"
    monkeypatch.setenv("MATHFORGE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert train_main(["log-mlflow", "--loss-log", str(log), "--run-name", "cli"]) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    db = sqlite3.connect(home / "mlflow.db")
    history = db.execute(
        "select step, value from metrics where run_uuid=? and key='loss' order by step", (run_id,)
    ).fetchall()
    assert [s for s, _ in history] == list(range(1, 13))
    assert history[-1][1] == pytest.approx(steps[-1]["loss"])
    val = db.execute("select step from metrics where run_uuid=? and key='val_exact'", (run_id,)).fetchall()
    assert sorted(s for (s,) in val) == [6, 12]
    status = db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()[0]
    assert status == "FINISHED"


@pytest.mark.integration
def test_train_tiny_flow_on_cpu(tmp_path, monkeypatch, prefect_server, tiny_model_dir):
    """The deployment's flow for real: data through the sandbox, training, checkpoint artifact, MLflow."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.train_tiny import train_tiny

    monkeypatch.setenv("MATHFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MATHFORGE_ARTIFACTS", raising=False)
    kwargs = dict(
        num_train=16, steps=4, batch_size=4, eval_every=2, model_overrides=SMALL, device="cpu", experiment="t"
    )
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        first = train_tiny(**kwargs, ship_to=str(tmp_path / "shipped"))
        again = train_tiny(**kwargs)
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # send the run logs while the server is up (it stops before exit)

    assert not first["cached"] and again["cached"]
    assert again["checkpoint"] == first["checkpoint"] and again["data"] == first["data"]
    model_dir = Path(first["model_dir"])
    assert (model_dir / "model.safetensors").read_bytes() == (
        tmp_path / "shipped" / "model.safetensors"
    ).read_bytes()
    from artifacts import ArtifactRef
    from artifacts.store import default_store

    data_dir = default_store().path(ArtifactRef(**first["data"]))
    summary = json.loads((data_dir / "summary.json").read_text())
    assert summary["num_train"] == 16 and len(summary["families"]) == 16
    shipped = {p.problem for p in load_problems("tiny")}
    train = read_records(data_dir / "train.jsonl.gz")
    assert len(train) == 16 and not {r["problem"] for r in train} & shipped  # never a shipped problem
    assert all("```output\n" in r["reference_solution"] for r in train)

    db = sqlite3.connect(tmp_path / "home" / "mlflow.db")
    for result in (first, again):  # the cached run gets the stored curves too
        run_id = result["mlflow_run_id"]
        steps = db.execute(
            "select step from metrics where run_uuid=? and key='loss' order by step", (run_id,)
        ).fetchall()
        assert [s for (s,) in steps] == [1, 2, 3, 4]
        keys = {k for (k,) in db.execute("select key from latest_metrics where run_uuid=?", (run_id,))}
        assert {"loss", "lr", "grad_norm", "val_loss", "val_token_acc", "val_exact", "final_loss"} <= keys
        tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
        assert tags["checkpoint.digest"] == first["checkpoint"]["digest"] and "prefect.flow_run_id" in tags
        assert db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()[0] == "FINISHED"
