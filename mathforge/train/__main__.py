"""`python -m mathforge.train {data,fit,log-mlflow}`: the training steps without Prefect (see __init__)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from mathforge.train import DEFAULT_SKELETON, fit_from_files
from mathforge.train.trainer import TrainConfig


def _model_override(text: str) -> tuple[str, int | float | str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def cmd_data(args: argparse.Namespace) -> int:
    from mathforge.data.problem_gen import sandbox_executor
    from mathforge.train.data import build_training_data

    def progress(done: int, total: int) -> None:
        print(f"sandbox: {done}/{total} programs run", file=sys.stderr, flush=True)

    execute = sandbox_executor(args.sandbox_url, lanes=args.lanes, progress=progress)
    summary = build_training_data(args.out, args.num_train, args.seed, execute=execute)
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "model_overrides"},
        model_overrides=dict(args.model or []),
    )
    out = Path(args.out)
    loss_log = Path(args.loss_log) if args.loss_log else out.parent / f"{out.name}-loss.jsonl"
    every = max(1, args.print_every)

    def show(record: dict) -> None:
        if record.get("event") in ("start", "eval", "end") or record.get("step", 1) % every == 0:
            print(json.dumps(record, sort_keys=True), flush=True)

    summary = fit_from_files(
        args.data,
        out,
        cfg,
        skeleton=args.skeleton,
        device=args.device,
        loss_log=loss_log,
        on_record=show,
        max_train=args.max_train,
        time_budget_s=args.time_budget_s,
    )
    print(f"wrote {out} and {loss_log}: final loss {summary['final_loss']:.4f}", flush=True)
    return 0


def cmd_log_mlflow(args: argparse.Namespace) -> int:
    from mathforge.train.mlflow_log import import_loss_log

    run_id = import_loss_log(
        args.loss_log, experiment=args.experiment, run_name=args.run_name, artifacts=args.artifact or ()
    )
    print(run_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mathforge.train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="build train.jsonl.gz: synthetic problems with sandbox-run solutions")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-train", type=int, required=True)
    p.add_argument("--seed", type=int, default=7_000_001)
    p.add_argument("--sandbox-url", help="a running `mathforge sandbox` (default: start one)")
    p.add_argument("--lanes", type=int, default=4)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("fit", help="train a model from a skeleton checkpoint; write an HF checkpoint")
    p.add_argument("--data", required=True, help="train.jsonl(.gz) or a directory holding train.jsonl.gz")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--skeleton", default=str(DEFAULT_SKELETON), help="config + tokenizer to start from")
    p.add_argument("--loss-log", help="JSONL loss log (default: <out>-loss.jsonl beside --out)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-train", type=int, help="use only the first N training records")
    p.add_argument("--print-every", type=int, default=50)
    p.add_argument("--time-budget-s", type=float, help="lower --steps to end training within about this time")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        value = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument(
        "--model", action="append", type=_model_override, metavar="KEY=VALUE", help="config override"
    )
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("log-mlflow", help="import a finished run's loss log into MLflow")
    p.add_argument("--loss-log", required=True)
    p.add_argument("--experiment", default="mathforge-train-tiny")
    p.add_argument("--run-name")
    p.add_argument("--artifact", action="append", help="another file to attach (e.g. the results JSON)")
    p.set_defaults(func=cmd_log_mlflow)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
