"""Start `mathforge serve` as a real subprocess on a free 127.0.0.1 port (shared by the serving tests)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mathforge.serving import ServerProcess, free_port, mathforge_argv

MODEL_NAME = "tiny-test"


def start_server(model_dir: Path, *extra: str, name: str = MODEL_NAME) -> tuple[ServerProcess, str]:
    """Returns (process, root URL like http://127.0.0.1:PORT); stop it with `proc.stop()`."""
    port = free_port()
    argv = mathforge_argv(
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *extra,
    )
    log = Path(tempfile.mkdtemp(prefix="mathforge-serve-")) / "serve.log"
    proc = ServerProcess(
        argv,
        health_url=f"http://127.0.0.1:{port}/health",
        log_file=log,
        startup_timeout=120,
        name="mathforge serve",
    )
    proc.start()
    return proc, f"http://127.0.0.1:{port}"
