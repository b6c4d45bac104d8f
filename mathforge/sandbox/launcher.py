"""Start `mathforge sandbox` as a subprocess from other code (flows, the solver, tests).

    from mathforge.sandbox import SandboxProcess

    with SandboxProcess(args=["--max-workers", "4"]) as sb:      # a free 127.0.0.1 port
        sb.url          # "http://127.0.0.1:<port>"; NeMo-Skills: NEMO_SKILLS_SANDBOX_HOST/PORT
        sb.health()     # GET /health as a dict

Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SandboxProcess:
    """`python -m mathforge.sandbox --host H --port P *args` in its own process group."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        args: list[str] | tuple = (),
        python: str = sys.executable,
        log_path: str | os.PathLike | None = None,
        env: dict | None = None,
        startup_timeout: float = 60.0,
    ):
        self.host, self.port = host, port
        self.args = [str(a) for a in args]
        self.python = python
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> SandboxProcess:
        for attempt in range(3):
            port = self.port or free_port(self.host)
            cmd = [
                self.python,
                "-m",
                "mathforge.sandbox",
                "--host",
                self.host,
                "--port",
                str(port),
                *self.args,
            ]
            if self.log_path:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "ab")  # noqa: SIM115
                out = self._log
            else:
                out = subprocess.DEVNULL
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
            self.port = port
            if self._wait_healthy():
                return self
            code = self.proc.poll()
            self.stop()
            if code is None or self.port != port or attempt == 2:
                break
            self.port = None  # port taken between choosing and binding: choose again
        raise RuntimeError(
            f"sandbox did not become healthy on {self.host}:{port}"
            + (f"; see {self.log_path}" if self.log_path else "")
        )

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self.health(timeout=2)
                return True
            except (OSError, ValueError):
                time.sleep(0.1)
        return False

    def health(self, timeout: float = 5) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:  # noqa: S310 — loopback
            return json.loads(r.read())

    def stop(self, timeout: float = 15) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> SandboxProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
