"""`mathforge` command line: one sub-command per capability, each registered by its own package.

Registration modules stay import-light (heavy imports happen inside the handlers), so `mathforge --help`
and small commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mathforge.errors import UserError

# module path -> provides `register(subparsers)`; each adds one or more sub-commands with `func` set.
COMMAND_MODULES = [
    "mathforge.commands",
    "artifacts.cli",
    "mathforge.server.cli",
    "mathforge.bench.cli",
    "mathforge.bench.engine_speed",
    "mathforge.sandbox.cli",
    "mathforge.solve.cli",
    "mathforge.drafter.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mathforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a capability not present in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:  # bad input: a clear message, no traceback
        print(f"mathforge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
