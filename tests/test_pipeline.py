"""The pipeline end to end, through a real Prefect server, real `mathforge serve` processes and MLflow.

One module-scoped MATHFORGE_HOME carries the artifact store across tests, so the order matters: the first
test builds everything, the later ones prove cache hits, key isolation, repair and concurrency.
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
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def small_preset(tmp: Path, name: str = "small", **calibration) -> Path:
    preset = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    preset["name"] = name
    preset["calibration"].update({"num_samples": 8, "max_seq_len": 256, **calibration})
    preset["engine"].update({"max_slots": 4, "max_model_len": 1024})
    preset["bench"].update({"num_prompts": 4, "concurrency": [1, 2], "max_tokens": 8, "warmup": 1})
    preset["evaluate"].update({"num_problems": 3, "tokens_to_generate": 24, "concurrent_problems": 3})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def mathforge(home: Path, api_url: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MATHFORGE_HOME": str(home), "PREFECT_API_URL": api_url}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mathforge.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, (
        f"mathforge {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def built_refs(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    start = proc.stdout.index("{")
    return json.loads(proc.stdout[start:])


def objects(home: Path) -> dict[str, float]:
    """Every published artifact object with its manifest's mtime: a rebuild would change the set or a time."""
    root = home / "artifacts" / "objects"
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/manifest.json")}


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
    assert set(summary["metrics"]) == {"bf16", "fp8"}

    db = sqlite3.connect(home / "mlflow.db")
    parent_id = summary["mlflow_parent_run_id"]
    children = [
        r[0]
        for r in db.execute(
            "select run_uuid from tags where key='mlflow.parentRunId' and value=?", (parent_id,)
        )
    ]
    assert len(children) == 2
    for child in children:
        keys = {r[0] for r in db.execute("select key from latest_metrics where run_uuid=?", (child,))}
        assert {"ttft_ms_p50", "tpot_ms_p50", "output_tok_s", "accuracy", "maj_at_k", "mean_tokens"} <= keys
    rows = [json.loads(line) for line in next(home.glob("runs/*/eval-fp8.jsonl")).read_text().splitlines()]
    assert len(rows) == 3 and all({"generation", "predicted_answer", "is_correct"} <= set(r) for r in rows)
    artifacts_of_parent = list((home / "mlartifacts").rglob("plots/*.png"))
    assert artifacts_of_parent, "the parent run has no plots"


def test_second_build_is_all_cache_hits(home, preset, prefect_server):
    before = objects(home)
    assert len(before) >= 5  # checkpoint, calibration, fp8 checkpoint, two engines
    proc = mathforge(home, prefect_server, "build", "--preset", str(preset))
    first = built_refs(proc)
    assert objects(home) == before
    log = proc.stdout + proc.stderr
    for task in ("checkpoint", "calibration", "quantize-fp8", "build-engine"):  # what the Prefect UI shows
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


def test_concurrent_builds_build_each_artifact_once(tmp_path, prefect_server):
    home = tmp_path / "home"
    preset = small_preset(tmp_path)
    env = {**os.environ, "MATHFORGE_HOME": str(home), "PREFECT_API_URL": prefect_server}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mathforge.cli", "build", "--preset", str(preset)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    refs = [json.loads(out[out.index("{") :]) for out, _ in outs]
    assert refs[0] == refs[1]
    events = [json.loads(line) for line in (home / "artifacts" / "events.jsonl").read_text().splitlines()]
    built = [e for e in events if e["event"] == "built"]
    kinds = sorted(e["kind"] for e in built)
    assert kinds == sorted(["checkpoint", "calibration", "fp8-checkpoint", "engine", "engine"]), kinds


def test_evaluate_cli_prints_one_json_object_last(home, preset, prefect_server):
    proc = mathforge(
        home, prefect_server, "evaluate", "--preset", str(preset), "--variants", "bf16", "--no-tools"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"bf16"}
    metrics = result["bf16"]
    assert {"accuracy", "maj_at_k", "mean_tokens", "time_per_problem_s", "code_executions_mean"} <= set(
        metrics
    )
    assert metrics["num_problems"] == 3 and metrics["code_executions_mean"] == 0  # --no-tools: no sandbox
    assert 0 < metrics["mean_tokens"] <= 24
