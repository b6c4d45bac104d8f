"""Helpers of the pipeline integration tests: a small tiny-based preset and the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FOUR = ("bf16", "fp8", "bf16+redrafter", "fp8+redrafter")  # the tiny preset's variants


def small_preset(tmp: Path, name: str = "small", **calibration) -> Path:
    preset = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    preset["name"] = name
    assert preset["variants"] == list(FOUR)
    preset["calibration"].update({"num_samples": 8, "max_seq_len": 256, **calibration})
    preset["engine"].update({"max_slots": 4, "max_model_len": 1024})
    preset["bench"].update({"num_prompts": 4, "concurrency": [1, 2], "max_tokens": 8, "warmup": 1})
    preset["evaluate"].update({"num_problems": 3, "tokens_to_generate": 24, "concurrent_problems": 3})
    drafter = {"data_nrows": 24, "steps": 3, "batch_size": 4, "max_seq_len": 256, "eval_nrows": 3}
    preset["drafter"] = {**(preset.get("drafter") or {}), **drafter}
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
