"""Run a server (`mathforge serve`, the sandbox, trtllm-serve...) as a child process, safely.

The child gets its own process group so it can be stopped with everything it spawned; it is always
stopped on exit (context manager), and it stops itself if its parent dies (no orphans even on SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

PARENT_ENV = "MATHFORGE_PARENT_PID"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_with_parent() -> None:
    """In a child server: exit as soon as the process that started us is gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    parent_pid = int(parent)

    def watch() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                if os.getpgrp() == os.getpid():  # we lead our group: take our children with us
                    os.killpg(os.getpgrp(), signal.SIGTERM)
                    time.sleep(2)
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class ServerProcess:
    """`with ServerProcess([...], health_url=...) as srv:` starts, waits for health, always stops."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        health_url: str,
        log_file: Path,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        name: str = "server",
    ) -> None:
        self.argv = list(argv)
        self.health_url = health_url
        self.log_file = Path(log_file)
        self.env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
        self.startup_timeout = startup_timeout
        self.name = name
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before becoming healthy; "
                    f"last log lines ({self.log_file}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.health_url, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(
            f"{self.name} not healthy after {self.startup_timeout:.0f}s; log:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mathforge_argv(*args: str) -> list[str]:
    """Run the CLI with this interpreter, so a venv's mathforge is used without relying on PATH."""
    return [sys.executable, "-m", "mathforge.cli", *args]
