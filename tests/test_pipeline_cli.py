"""CLI runs in their own MATHFORGE_HOME: two concurrent builds, and `mathforge evaluate`.

A module apart from test_pipeline.py so it runs beside it on the other test worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _pipeline import REPO, mathforge, small_preset

pytestmark = pytest.mark.integration


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
    assert kinds == sorted(["checkpoint", "calibration", "fp8-checkpoint", "drafter"] + ["engine"] * 4), kinds


def test_evaluate_cli_prints_one_json_object_last(tmp_path, prefect_server):
    home, preset = tmp_path / "home", small_preset(tmp_path)
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
