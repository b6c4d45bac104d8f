"""The pipeline end to end, through a real Prefect server, real `mathforge serve` processes and MLflow.

One module-scoped MATHFORGE_HOME carries the artifact store across tests, so the order matters: the first
test builds everything, the later ones prove cache hits, key isolation and repair.

The preset is the tiny one with its four variants (bf16, fp8, and both with the ReDrafter drafter the
pipeline trains), the drafter trained for a few steps only: these tests check the plumbing, not its quality.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from _pipeline import FOUR, REPO, built_refs, mathforge, objects, small_preset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline-home")


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    return small_preset(tmp_path_factory.mktemp("presets"))


def test_pipeline_runs_end_to_end_and_tracks_every_variant(home, preset, prefect_server):
    proc = mathforge(home, prefect_server, "pipeline", "--preset", str(preset))
    assert "variant comparison" in proc.stdout
    assert "bf16" in proc.stdout and "fp8" in proc.stdout
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"metrics"')][-1])
    assert set(summary["metrics"]) == set(FOUR)
    for v in ("bf16+redrafter", "fp8+redrafter"):
        assert 1.0 <= summary["metrics"][v]["accept_len_mean"] <= 4.0
    assert "accept_len_mean" not in summary["metrics"]["fp8"]

    db = sqlite3.connect(home / "mlflow.db")
    parent_id = summary["mlflow_parent_run_id"]
    nested = [
        r[0]
        for r in db.execute(
            "select run_uuid from tags where key='mlflow.parentRunId' and value=?", (parent_id,)
        )
    ]
    roles = {
        run: db.execute(
            "select value from tags where run_uuid=? and key='mathforge.role'", (run,)
        ).fetchone()[0]
        for run in nested
    }
    children = [run for run, role in roles.items() if role == "variant"]
    assert (
        len(children) == 4 and sorted(roles.values()) == ["drafter"] + ["variant"] * 4
    )  # + its training run
    for child in children:
        keys = {r[0] for r in db.execute("select key from latest_metrics where run_uuid=?", (child,))}
        assert {"ttft_ms_p50", "tpot_ms_p50", "output_tok_s", "accuracy", "maj_at_k", "mean_tokens"} <= keys
        (variant,) = db.execute(
            "select value from tags where run_uuid=? and key='variant'", (child,)
        ).fetchone()
        assert ("accept_len_mean" in keys) == variant.endswith("+redrafter")
    parent_keys = {r[0] for r in db.execute("select key from latest_metrics where run_uuid=?", (parent_id,))}
    assert {"fp8-redrafter.output_tok_s", "fp8-redrafter.accept_len_mean", "bf16.output_tok_s"} <= parent_keys
    rows = [json.loads(line) for line in next(home.glob("runs/*/eval-fp8.jsonl")).read_text().splitlines()]
    assert len(rows) == 3 and all({"generation", "predicted_answer", "is_correct"} <= set(r) for r in rows)
    # greedy evaluation: speculative decoding changes the speed, never the text
    for v in ("bf16", "fp8"):
        plain, spec = (
            [
                json.loads(x)["generation"]
                for x in next(home.glob(f"runs/*/eval-{name}.jsonl")).read_text().splitlines()
            ]
            for name in (v, f"{v}+redrafter")
        )
        assert spec == plain
    artifacts_of_parent = list((home / "mlartifacts").rglob("plots/*.png"))
    assert artifacts_of_parent, "the parent run has no plots"


def test_second_build_is_all_cache_hits(home, preset, prefect_server):
    before = objects(home)
    assert len(before) >= 8  # checkpoint, calibration, fp8 checkpoint, drafter, four engines
    proc = mathforge(home, prefect_server, "build", "--preset", str(preset))
    first = built_refs(proc)
    assert objects(home) == before
    log = proc.stdout + proc.stderr
    tasks = (
        "checkpoint",
        "calibration",
        "quantize-fp8",
        "train-drafter",
        "build-engine",
        "build-speculative-engine",
    )
    for task in tasks:  # what the Prefect UI shows
        assert re.search(rf"Task run '{task}-\w+' - Finished in state Cached", log), (
            f"{task} not Cached:\n{log[-3000:]}"
        )
    second = built_refs(mathforge(home, prefect_server, "build", "--preset", str(preset)))
    assert first == second


def test_changing_calibration_changes_fp8_key_but_not_bf16(home, preset, prefect_server, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + {i * 7}?", "expected_answer": str(8 * i)}) + "\n"
            for i in range(12)
        )
    )
    other = small_preset(tmp_path, name="small-other-calib", source=str(data), split=None)
    base = built_refs(mathforge(home, prefect_server, "build", "--preset", str(preset)))
    changed = built_refs(mathforge(home, prefect_server, "build", "--preset", str(other)))
    assert changed["bf16"]["key"] == base["bf16"]["key"]
    assert changed["bf16"]["digest"] == base["bf16"]["digest"]
    assert changed["fp8"]["key"] != base["fp8"]["key"]
    assert changed["bf16+redrafter"] == base["bf16+redrafter"]  # the drafter is trained on the bf16 model
    assert changed["fp8+redrafter"]["key"] != base["fp8+redrafter"]["key"]


def test_deleted_artifact_is_rebuilt_not_a_stale_hit(home, preset, prefect_server):
    refs = built_refs(mathforge(home, prefect_server, "build", "--preset", str(preset)))
    fp8_engine = home / "artifacts" / "objects" / refs["fp8"]["digest"]
    spec = json.loads((fp8_engine / "engine.json").read_text())
    weights = home / "artifacts" / "objects" / spec["weights"]["digest"]
    shutil.rmtree(weights)  # the FP8 checkpoint, by hand
    again = built_refs(mathforge(home, prefect_server, "build", "--preset", str(preset)))
    assert (weights / "manifest.json").exists() or any(
        (home / "artifacts" / "objects").glob("*/hf_quant_config.json")
    )
    verify = subprocess.run(
        [sys.executable, "-m", "mathforge.cli", "artifacts", "verify"],
        capture_output=True,
        text=True,
        env={**os.environ, "MATHFORGE_HOME": str(home)},
        cwd=REPO,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert again["bf16"] == refs["bf16"]
