"""`mathforge artifacts ls|show|verify|gc`: inspect and maintain the artifact store.

Registration is import-light; the store and rich are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "artifacts",
        help="inspect and maintain the content-addressed artifact store",
        description="Inspect and maintain the artifact store ($MATHFORGE_HOME/artifacts).",
    )
    p.add_argument("--root", help="store root (default: $MATHFORGE_ARTIFACTS or $MATHFORGE_HOME/artifacts)")
    sub = p.add_subparsers(dest="artifacts_command", metavar="ACTION")

    ls = sub.add_parser("ls", help="list stored artifacts")
    ls.add_argument("--kind", help="only artifacts of this kind")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)

    show = sub.add_parser("show", help="show one artifact's manifest")
    show.add_argument("digest", help="content digest or recipe key (a unique prefix is enough)")
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    show.set_defaults(func=_show)

    verify = sub.add_parser("verify", help="re-hash artifacts; exit 1 when any is damaged")
    verify.add_argument("digest", nargs="?", help="only this artifact (digest prefix)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=_verify)

    gc = sub.add_parser("gc", help="remove stale build dirs, dangling keys and unreferenced objects")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    gc.add_argument(
        "--keep-unreferenced", action="store_true", help="keep objects that no recipe key refers to"
    )
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    gc.set_defaults(func=_gc)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _store(args: argparse.Namespace):
    from artifacts.store import ArtifactStore, default_store

    return ArtifactStore(args.root) if args.root else default_store()


def _console():
    from rich.console import Console

    console = Console(soft_wrap=False)
    if not console.is_terminal:  # logs and pipes: wide enough for full rows, never truncated mid-digest
        console = Console(soft_wrap=False, width=max(console.width, 160))
    return console


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _ls(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = store.ls(kind=args.kind)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"artifacts in {store.root}", title_justify="left")
    for col, kw in (
        ("digest", {"no_wrap": True}),
        ("kind", {}),
        ("size", {"justify": "right"}),
        ("files", {"justify": "right"}),
        ("created", {"no_wrap": True}),
        ("build s", {"justify": "right"}),
        ("keys", {"no_wrap": True}),
    ):
        table.add_column(col, **kw)
    for r in rows:
        table.add_row(
            r.digest[:12],
            r.kind,
            human_size(r.total_size),
            str(r.file_count),
            (r.created or "?").replace("+00:00", "Z"),
            "" if r.build_seconds is None else f"{r.build_seconds:.1f}",
            ", ".join(k[:12] for k in r.keys) or "-",
        )
    console = _console()
    console.print(table)
    console.print(f"{len(rows)} artifacts, {human_size(sum(r.total_size for r in rows))}")
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _store(args)
    info = store.show(args.digest)
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    from rich.table import Table

    console = _console()
    head = Table(show_header=False, title=f"artifact {info.get('digest', '?')}", title_justify="left")
    head.add_column("field", style="bold")
    head.add_column("value", overflow="fold")
    recipe = info.get("recipe") or {}
    for name, value in (
        ("digest", info.get("digest")),
        ("kind", info.get("kind")),
        ("path", info.get("path")),
        ("recipe key", info.get("key")),
        ("keys", ", ".join(info.get("keys") or []) or "-"),
        ("recipe version", recipe.get("version")),
        ("params", json.dumps(recipe.get("params"), sort_keys=True)),
        (
            "inputs",
            ", ".join(
                f"{n}={v.get('kind')}:{v.get('digest', '')[:12]}"
                for n, v in (info.get("inputs") or {}).items()
            )
            or "-",
        ),
        ("size", f"{human_size(info.get('total_size') or 0)} in {info.get('file_count', 0)} files"),
        ("created", info.get("created")),
        ("build seconds", info.get("build_seconds")),
        ("producer", ", ".join(f"{k} {v}" for k, v in (info.get("producer") or {}).items())),
        ("error", info.get("error")),
    ):
        if value is not None:
            head.add_row(name, str(value))
    if info.get("meta"):
        head.add_row("meta", json.dumps(info["meta"], sort_keys=True))
    console.print(head)
    files = Table(title="files", title_justify="left")
    files.add_column("path", overflow="fold")
    files.add_column("size", justify="right")
    files.add_column("sha256", no_wrap=True)
    for f in info.get("files") or []:
        files.add_row(f["path"], human_size(f["size"]), f["sha256"][:16])
    console.print(files)
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _store(args)
    count = 1 if args.digest else len(store.ls())
    problems = store.verify(args.digest)
    if args.json:
        print(
            json.dumps(
                {
                    "checked": count,
                    "problems": [{"digest": p.digest, "message": p.message} for p in problems],
                },
                indent=1,
            )
        )
        return 1 if problems else 0
    console = _console()
    if not problems:
        console.print(f"[green]OK[/green]: {count} artifact(s) verified in {store.root}")
        return 0
    from rich.table import Table

    table = Table(title=f"[red]damaged artifacts in {store.root}[/red]", title_justify="left")
    table.add_column("digest", no_wrap=True)
    table.add_column("problem", overflow="fold")
    for p in problems:
        table.add_row(p.digest[:12], p.message)
    console.print(table)
    bad = len({p.digest for p in problems})
    console.print(f"DAMAGED: {bad} of {count} artifact(s); the next run that needs them rebuilds them")
    return 1


def _gc(args: argparse.Namespace) -> int:
    store = _store(args)
    report = store.gc(dry_run=args.dry_run, keep_unreferenced=args.keep_unreferenced)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    console = _console()
    verb = "would remove" if report.dry_run else "removed"
    for label, items in (
        ("stale build dirs", report.tmp),
        ("trash", report.trash),
        ("dangling keys", report.keys),
        ("unreferenced objects", report.objects),
    ):
        for item in items:
            console.print(f"{verb} {label[:-1] if label.endswith('s') else label}: {item}", highlight=False)
    for item in report.skipped:
        console.print(f"skipped (in use): {item}", highlight=False)
    console.print(
        f"{'dry run: ' if report.dry_run else ''}{verb} {len(report.tmp)} stale build dir(s), {len(report.trash)} trash "
        f"item(s), {len(report.keys)} dangling key(s), {len(report.objects)} unreferenced object(s); "
        f"{human_size(report.bytes_freed)}",
        highlight=False,
    )
    return 0
