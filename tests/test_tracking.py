"""MLflow bookkeeping against a real store, and `mathforge ui` serving it over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mathforge.serving import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]


def fake_results(tok_s: float) -> dict:
    """A benchmark result shaped like mathforge.bench's: two concurrency levels."""
    levels = []
    for conc in (1, 4):
        metrics = {
            f"{k}_{s}": 10.0 * conc
            for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
            for s in ("mean", "p50", "p90", "p99")
        }
        metrics.update(
            output_tok_s=tok_s * conc, total_tok_s=2 * tok_s * conc, request_s=conc / 2, completed=8
        )
        levels.append({"concurrency": conc, "metrics": metrics, "requests": []})
    return {"metadata": {}, "levels": levels}


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MATHFORGE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_parent_and_child_runs_share_metric_names(home):
    from mathforge import tracking

    parent = tracking.start_parent_run("exp-a", "pipeline-x", {"preset": "x"})
    children = {}
    for variant, tok_s in (("bf16", 100.0), ("fp8", 180.0)):
        run = tracking.start_child_run(
            parent, variant, {"backend": "torch", "dtype": variant}, {"engine.digest": "d"}
        )
        headline = tracking.log_benchmark(run, fake_results(tok_s))
        assert headline["output_tok_s"] == tok_s * 4  # the highest concurrency level is the headline
        tracking.finish_run(run)
        children[variant] = run
    runs = tracking.child_runs(parent)
    assert {r.info.run_name for r in runs} == {"bf16", "fp8"}
    names = [set(r.data.metrics) for r in runs]
    assert names[0] == names[1] and {"ttft_ms_p50", "tpot_ms_p50", "output_tok_s"} <= names[0]
    client = tracking._client()
    history = client.get_metric_history(children["fp8"], "output_tok_s")
    assert sorted((m.step, m.value) for m in history) == [(1, 180.0), (4, 720.0)]  # a curve over concurrency
    url = tracking.compare_url("exp-a", children.values())
    assert "compare-runs" in url and children["bf16"] in httpx.URL(url).fragment.replace("%22", '"')


def test_mathforge_ui_serves_the_local_store(home):
    from mathforge import tracking

    parent = tracking.start_parent_run("exp-ui", "pipeline-ui", {"preset": "ui"})
    tracking.finish_run(parent)
    port = free_port()
    argv = [sys.executable, "-m", "mathforge.cli", "ui", "--port", str(port)]
    env = {**os.environ, "MATHFORGE_HOME": str(home)}
    with ServerProcess(
        argv,
        health_url=f"http://127.0.0.1:{port}/health",
        log_file=home / "ui.log",
        env=env,
        startup_timeout=480,  # MLflow's server starts slowly on 2 busy cores (once > 180 s in CI)
        name="mlflow ui",
    ):
        exp = httpx.get(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "exp-ui"},
            timeout=60,  # a loaded 2-core machine: the server's first queries can take seconds
        ).json()["experiment"]
        found = httpx.post(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [exp["experiment_id"]]},
            timeout=60,
        ).json()
        assert [r["info"]["run_id"] for r in found["runs"]] == [parent]
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=60).status_code == 200  # the UI itself


def test_pipeline_tags_carry_the_git_sha_and_host(home):
    from mathforge import tracking

    run = tracking.start_parent_run("exp-b", "p", {})
    tags = tracking._client().get_run(run).data.tags
    assert tags["host.torch"] and tags["host.cpu_count"] and tags["host.mathforge"]
    sha = tags["git.sha"]
    expected = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    assert sha == (expected or "unknown")
