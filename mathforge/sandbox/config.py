"""Settings of `mathforge sandbox` (import-light: the CLI builds its parser from these)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'512m', '2g', '1.5GiB', '1048576' -> bytes (powers of 1024); 0 means no limit."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512m, 2g, 1048576)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


@dataclass
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 6000
    uds: str | None = None  # also listen on this Unix socket (how clients reach a --network none container)
    # concurrency: cells executing at once, requests waiting beyond that (then HTTP 503), live sessions
    max_workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    queue: int = 128
    max_sessions: int = 128
    session_timeout: float = 600.0  # idle seconds before a session is stopped; 0 = never
    max_timeout: float = 900.0  # a request's `timeout` is capped at this
    # per-process limits of sandboxed code
    memory_limit: int = 4 << 30  # RLIMIT_AS (address space) and RLIMIT_DATA
    cpu_limit: int = 600  # RLIMIT_CPU seconds, per process over a session's lifetime
    nproc_limit: int = 64  # RLIMIT_NPROC: processes + threads of one worker
    file_size_limit: int = 64 << 20  # RLIMIT_FSIZE
    open_files_limit: int = 256  # RLIMIT_NOFILE
    disk_limit: int = 128 << 20  # size of the private working directory (a tmpfs, with namespaces)
    nice: int = 10
    # protocol limits
    max_output_characters: int = 1_000_000  # ceiling on a request's max_output_characters
    max_body_bytes: int = 10 << 20  # nginx's client_max_body_size in NeMo-Skills' image
    # how to run code
    python: str = field(default_factory=lambda: sys.executable)
    shell: str = "auto"  # auto | ipython | builtin
    isolation: str = "auto"  # auto | strict (refuse to start without a network namespace) | none
    workdir: str | None = None  # parent of the per-session directories (default: a new temp dir)
    uid_base: int = 200000  # root only: worker slot i runs as uid/gid uid_base + i
    spawn_timeout: float = 30.0
    log_level: str = "info"

    def validate(self) -> None:
        if self.max_workers < 1 or self.queue < 0 or self.max_sessions < 1:
            raise ValueError("--max-workers and --max-sessions must be >= 1, --queue >= 0")
        if self.shell not in ("auto", "ipython", "builtin"):
            raise ValueError("--shell must be auto, ipython or builtin")
        if self.isolation not in ("auto", "strict", "none"):
            raise ValueError("--isolation must be auto, strict or none")
        if not os.path.exists(self.python):
            raise ValueError(f"--python {self.python}: no such file")
