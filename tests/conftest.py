"""Shared test setup: every test session gets its own MATHFORGE_HOME and Prefect/MLflow state."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = REPO / "mathforge" / "data" / "tiny_model"

_session_home = Path(tempfile.mkdtemp(prefix="mathforge-test-"))
os.environ.setdefault("MATHFORGE_HOME", str(_session_home / "home"))
os.environ.setdefault("PREFECT_HOME", str(_session_home / "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests run a client and one or more servers at once on 2 cores: one torch thread each avoids thrashing
# (measured: engine + solve integration tests 40 s -> 28 s); inherited by every server a test starts
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The shipped tiny Qwen2 checkpoint (config, safetensors, tokenizer with ChatML + tool tokens)."""
    if not (TINY_MODEL_DIR / "config.json").exists():
        pytest.fail(f"tiny model missing at {TINY_MODEL_DIR}: run `python -m mathforge.data.make_tiny`")
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` (SQLite) on loopback; yields its API URL. Shared by integration tests."""
    import subprocess
    import sys
    import time

    import httpx

    from mathforge.serving import free_port

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_URL": "",
    }
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    import signal

    # deliver logs and events that in-process flows left queued while the server is still up: otherwise the
    # interpreter's exit retries them against a stopped server for a minute
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
