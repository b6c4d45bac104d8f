"""`mathforge sandbox`: start the code-execution sandbox server (NeMo-Skills-compatible protocol)."""

from __future__ import annotations

import argparse

from mathforge.sandbox.config import SandboxConfig, parse_size

HELP = "run the NeMo-Skills-compatible Python code sandbox (POST /execute, sessions, isolation)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SandboxConfig()
    size = parse_size
    p.add_argument(
        "--host", default=d.host, help="address to bind (default %(default)s; 0.0.0.0 in a container)"
    )
    p.add_argument("--port", type=int, default=d.port, help="port (default %(default)s, as NeMo-Skills)")
    p.add_argument(
        "--uds",
        default=None,
        metavar="PATH",
        help="also listen on this Unix socket (for a container without network; mode 0666)",
    )
    g = p.add_argument_group("concurrency")
    g.add_argument(
        "--max-workers",
        type=int,
        default=d.max_workers,
        help="cells executing at once (default: number of CPUs, at least 2: %(default)s)",
    )
    g.add_argument(
        "--queue",
        type=int,
        default=d.queue,
        help="requests that may wait for a worker; beyond that HTTP 503 (default %(default)s)",
    )
    g.add_argument(
        "--max-sessions",
        type=int,
        default=d.max_sessions,
        help="live ipython sessions; the least recently used idle one is stopped to make room "
        "(the client's history replay restores it) (default %(default)s)",
    )
    g.add_argument(
        "--session-timeout",
        type=float,
        default=d.session_timeout,
        help="stop sessions idle this many seconds; 0 = never (default %(default)s)",
    )
    g.add_argument(
        "--max-timeout",
        type=float,
        default=d.max_timeout,
        help="ceiling on a request's `timeout` in seconds (default %(default)s)",
    )
    g = p.add_argument_group("limits of sandboxed code (per process)")
    g.add_argument(
        "--memory-limit",
        type=size,
        default=d.memory_limit,
        metavar="SIZE",
        help="address space, RLIMIT_AS (default 4g)",
    )
    g.add_argument(
        "--cpu-limit",
        type=int,
        default=d.cpu_limit,
        metavar="SECONDS",
        help="CPU seconds over a session's life, RLIMIT_CPU (default %(default)s)",
    )
    g.add_argument(
        "--nproc-limit",
        type=int,
        default=d.nproc_limit,
        metavar="N",
        help="processes and threads per worker, RLIMIT_NPROC (default %(default)s)",
    )
    g.add_argument(
        "--file-size-limit",
        type=size,
        default=d.file_size_limit,
        metavar="SIZE",
        help="largest file, RLIMIT_FSIZE (default 64m)",
    )
    g.add_argument(
        "--open-files-limit",
        type=int,
        default=d.open_files_limit,
        metavar="N",
        help="open descriptors, RLIMIT_NOFILE (default %(default)s)",
    )
    g.add_argument(
        "--disk-limit",
        type=size,
        default=d.disk_limit,
        metavar="SIZE",
        help="size of a session's private working directory (tmpfs) (default 128m)",
    )
    g.add_argument(
        "--nice", type=int, default=d.nice, help="niceness of sandboxed code (default %(default)s)"
    )
    g = p.add_argument_group("execution")
    g.add_argument(
        "--python",
        default=d.python,
        help="interpreter that runs the code, with its packages (default: this one)",
    )
    g.add_argument(
        "--shell",
        choices=["auto", "ipython", "builtin"],
        default=d.shell,
        help="ipython sessions: IPython if importable (auto), or the builtin IPython-like shell",
    )
    g.add_argument(
        "--isolation",
        choices=["auto", "strict", "none"],
        default=d.isolation,
        help="auto: strongest available, warn loudly if there is no network isolation; "
        "strict: refuse to start without it; none: no namespaces",
    )
    g.add_argument(
        "--workdir", default=None, help="parent of the per-session directories (default: new temp dir)"
    )
    g.add_argument(
        "--uid-base",
        type=int,
        default=d.uid_base,
        help="when root: worker slot i runs as uid/gid UID_BASE+i (default %(default)s)",
    )
    g.add_argument(
        "--max-output-characters",
        type=int,
        default=d.max_output_characters,
        help="ceiling on a request's max_output_characters (default %(default)s)",
    )
    g.add_argument(
        "--max-body-size",
        type=size,
        default=d.max_body_bytes,
        dest="max_body_bytes",
        metavar="SIZE",
        help="largest request body (default 10m); larger gets HTTP 413",
    )
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    fields = SandboxConfig.__dataclass_fields__
    return SandboxConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run(args: argparse.Namespace) -> int:
    from mathforge.errors import UserError

    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    from mathforge.sandbox.server import serve

    serve(cfg)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sandbox", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m mathforge.sandbox`: the same flags as `mathforge sandbox`."""
    import sys

    from mathforge.errors import UserError

    p = argparse.ArgumentParser(prog="python -m mathforge.sandbox", description=HELP)
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except UserError as exc:
        print(f"mathforge sandbox: error: {exc}", file=sys.stderr)
        return 2
