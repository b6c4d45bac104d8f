"""Servers the solve tests start as real subprocesses on 127.0.0.1 (helpers, not tests)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from mathforge.serving import ServerProcess, free_port, mathforge_argv

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@contextmanager
def scripted_server(log_dir: Path) -> Iterator[str]:
    """tests/scripted_openai_server.py; yields its base URL."""
    port = free_port()
    argv = [sys.executable, str(TESTS / "scripted_openai_server.py"), "--port", str(port)]
    health = f"http://127.0.0.1:{port}/health"
    with ServerProcess(argv, health_url=health, log_file=log_dir / "scripted.log", startup_timeout=60):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def sandbox_server(log_dir: Path) -> Iterator[str]:
    """`mathforge sandbox` (or MATHFORGE_TEST_SANDBOX_URL, an already-running compatible sandbox)."""
    url = os.environ.get("MATHFORGE_TEST_SANDBOX_URL")
    if url:
        yield url.rstrip("/")
        return
    if not (REPO / "mathforge" / "sandbox" / "cli.py").exists():
        pytest.skip("mathforge sandbox is not built yet (mathforge/sandbox/cli.py missing)")
    port = free_port()
    argv = mathforge_argv("sandbox", "--port", str(port))
    health = f"http://127.0.0.1:{port}/health"
    with ServerProcess(argv, health_url=health, log_file=log_dir / "sandbox.log", startup_timeout=60):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def model_server(model_dir: Path, log_dir: Path, *, name: str = "tiny", max_slots: int = 2) -> Iterator[str]:
    """`mathforge serve MODEL_DIR` on CPU; yields its base URL."""
    port = free_port()
    argv = mathforge_argv(
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--max-slots",
        str(max_slots),
    )
    health = f"http://127.0.0.1:{port}/health"
    with ServerProcess(argv, health_url=health, log_file=log_dir / "serve.log", startup_timeout=180):
        yield f"http://127.0.0.1:{port}"


def prometheus(base_url: str) -> dict[str, float]:
    """`/metrics` as {name{labels}: value} (labels kept verbatim, model_name label dropped)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        key = re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")
        out[key] = float(value)
    return out
