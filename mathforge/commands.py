"""Top-level commands: `pipeline` (the whole flow), `build` (artifacts only) and `ui` (MLflow UI)."""

from __future__ import annotations

import argparse
import json
import os
import time

from mathforge import paths


def prefect_env() -> None:
    """Keep Prefect quiet and local unless the user points it at a server (PREFECT_API_URL)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        prefect_home = paths.home() / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(prefect_home)


def _variants(text: str | None) -> list[str] | None:
    if not text:
        return None
    from mathforge.config import VARIANTS
    from mathforge.errors import UserError

    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return chosen


def cmd_pipeline(args: argparse.Namespace) -> int:
    prefect_env()
    from mathforge.config import load_preset

    cfg = load_preset(args.preset)  # fail fast, before any server starts
    variants = _variants(args.variants)
    if args.dry_run:  # the plan only: no GPU, no download, no server
        from mathforge.plan import build_plan

        print(build_plan(cfg, variants, evaluation=not args.no_evaluate).render())
        return 0
    from flows.pipeline import pipeline

    started = time.monotonic()
    result = pipeline(preset=args.preset, variants=variants, evaluation=not args.no_evaluate)
    result["total_s"] = round(time.monotonic() - started, 2)
    print(f"artifact stage: {result['artifact_stage_s']:.1f}s  total: {result['total_s']:.1f}s")
    print(f"MLflow: {result['mlflow_compare_url']}")
    print(
        json.dumps({k: result[k] for k in ("metrics", "artifact_stage_s", "total_s", "mlflow_parent_run_id")})
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    prefect_env()
    from mathforge.config import load_preset

    load_preset(args.preset)
    from flows.build_engines import build_engines

    engines = build_engines(preset=args.preset, variants=_variants(args.variants))
    print(json.dumps({v: ref.model_dump() for v, ref in engines.items()}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    prefect_env()
    from mathforge.config import load_preset
    from mathforge.errors import UserError

    load_preset(args.preset)
    for flag, value in (("--samples", args.samples), ("--temperature", args.temperature)):
        if value is not None and value < (1 if flag == "--samples" else 0):
            raise UserError(f"{flag} must be {'>= 1' if flag == '--samples' else '>= 0'}, got {value}")
    from flows.evaluate import evaluate

    results = evaluate(
        preset=args.preset,
        temperature=args.temperature,
        variants=_variants(args.variants),
        split=args.split,
        samples=args.samples,
        tools=False if args.no_tools else None,
    )
    print(json.dumps(results, sort_keys=True))  # the last line: one JSON object, variant -> metrics
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess
    import sys

    from mathforge import tracking

    uri = tracking.tracking_uri()
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    if uri.startswith("sqlite:"):
        argv += ["--artifacts-destination", str(paths.home() / "mlartifacts")]
    print(f"MLflow UI on http://{args.host}:{args.port} (store: {uri})")
    return subprocess.call(argv)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="build, serve, benchmark and compare the engine variants of a preset")
    p.add_argument("--preset", default="tiny", help="preset name in configs/ or a path to a preset YAML")
    p.add_argument("--variants", help="comma-separated subset of the preset's variants, e.g. bf16,fp8")
    p.add_argument("--no-evaluate", action="store_true", help="skip the accuracy evaluation step")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan: every command in order, with the artifact and recipe key it produces",
    )
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("build", help="build (or reuse) the engine artifacts of a preset, nothing else")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--variants")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "evaluate", help="solve a preset's problem set with each variant (tools via the sandbox)"
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--variants")
    p.add_argument("--split", help="problem split (default: the preset's evaluate.split)")
    p.add_argument("--samples", type=int, help="samples per problem (maj@k, pass@k)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the preset's)")
    p.add_argument("--no-tools", action="store_true", help="withhold the code tool: plain text reasoning")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ui", help="serve the MLflow UI over mathforge's tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
