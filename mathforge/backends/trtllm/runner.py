"""Run a list of built commands, one after another, streaming their output to a logger.

TensorRT-LLM builds run for tens of minutes: every output line goes to the log as it comes (Prefect's run
logger shows it in the UI), and a failure names the command and shows its last lines.
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from mathforge.backends.trtllm.commands import Command

TAIL_LINES = 40


class CommandFailed(RuntimeError):
    """An external command exited non-zero (or could not start)."""

    def __init__(self, command: Command, returncode: int | None, tail: list[str]):
        self.command = command
        self.returncode = returncode
        self.tail = tail
        what = "could not start" if returncode is None else f"exited with code {returncode}"
        super().__init__(f"{command.title} {what}: {command}\n" + "\n".join(tail[-TAIL_LINES:]))


def run_commands(
    commands: Iterable[Command],
    *,
    log: Callable[[str], object],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
) -> list[dict]:
    """Run `commands` in order (stop at the first failure); returns one record per command
    ({title, argv, seconds}). Output lines go to `log` and, when given, are appended to `log_file`."""
    records = []
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    sink = log_file.open("a", encoding="utf-8") if log_file else None
    try:
        for command in commands:
            log(f"$ {command}")
            tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
            started = time.monotonic()
            try:
                proc = subprocess.Popen(
                    command.to_list(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=cwd,
                    env=full_env,
                    text=True,
                    errors="replace",
                    bufsize=1,
                )
            except OSError as exc:
                raise CommandFailed(command, None, [str(exc)]) from exc
            assert proc.stdout is not None
            with proc:
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    tail.append(line)
                    if sink:
                        sink.write(line + "\n")
                    log(f"[{command.title}] {line}")
            if proc.returncode != 0:
                raise CommandFailed(command, proc.returncode, list(tail))
            seconds = round(time.monotonic() - started, 3)
            log(f"{command.title}: done in {seconds:.1f} s")
            records.append({"title": command.title, "argv": command.to_list(), "seconds": seconds})
    finally:
        if sink:
            sink.close()
    return records
