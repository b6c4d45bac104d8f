"""`mathforge drafter`: train a preset's ReDrafter drafter (a cached artifact) or evaluate a saved one."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "drafter",
        help="train or evaluate the ReDrafter drafter of a preset",
        description="ReDrafter (Apple's recurrent drafter) for a preset's base model, trained with the "
        "preset's `drafter:` settings; the result is a content-addressed artifact (reused when nothing changed).",
    )
    sub = p.add_subparsers(dest="drafter_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train the drafter (or reuse the stored one of the same recipe)")
    t.add_argument("--preset", default="tiny", help="preset name or .yaml path (default tiny)")
    t.add_argument("--out", default=None, help="also copy the drafter directory here")
    t.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: the preset's drafter.device)"
    )
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="held-out metrics and simulated acceptance of a saved drafter")
    e.add_argument("drafter_dir", help="a drafter directory (config.json + model.safetensors)")
    e.add_argument("--preset", default="tiny", help="preset name or .yaml path (default tiny)")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: the preset's drafter.device)")
    e.set_defaults(func=cmd_eval)


def _print_heldout(heldout: dict, n: int, top_k: int) -> None:
    cols = [f"top{k}" for k in range(1, top_k + 1)] + ["loss"]
    print("held-out  " + "  ".join(f"{c:>7}" for c in cols))
    for i in range(n):
        vals = [heldout[f"redrafter{i}_top{k}"] for k in range(1, top_k + 1)] + [
            heldout[f"redrafter{i}_loss"]
        ]
        print(f"head {i}    " + "  ".join(f"{v:7.4f}" for v in vals))
    print(
        f"simulated greedy speculative decoding: {heldout['accepted_drafts_mean']:.3f} drafted tokens accepted per "
        f"step of {n} ({heldout['tokens_per_step']:.3f} tokens per target step; histogram {heldout['accept_hist']})"
    )


def cmd_train(args: argparse.Namespace) -> int:
    import json
    import shutil
    from pathlib import Path

    from mathforge.commands import prefect_env

    prefect_env()
    from artifacts.store import default_store
    from mathforge.config import load_preset
    from mathforge.drafter.train import SUMMARY_FILE
    from tasks.drafter import drafter_tracking, resolve_data, train_drafter
    from tasks.model import checkpoint
    from tasks.sources import resolve_model

    cfg = load_preset(args.preset)
    settings = cfg.drafter if args.device is None else cfg.drafter.model_copy(update={"device": args.device})
    if settings.checkpoint:
        print(f"note: the preset names a pre-trained drafter ({settings.checkpoint}); training one anyway")
    data = resolve_data(settings)
    ckpt = checkpoint.fn(resolve_model.fn(cfg.model))
    with drafter_tracking(experiment=cfg.experiment):
        ref = train_drafter.fn(ckpt, data, settings)
    root = default_store().path(ref)
    summary = json.loads((root / SUMMARY_FILE).read_text())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in root.iterdir():
            if f.is_file() and f.name != "manifest.json":
                shutil.copyfile(f, out / f.name)
        root = out
    _print_heldout(summary["heldout"], settings.draft_len, settings.top_k)
    print(f"drafter {ref} in {root} (training {summary['timing_s']['total']:.1f}s when it was built)")
    print(json.dumps({"artifact": ref.model_dump(), "path": str(root), "heldout": summary["heldout"]}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from mathforge.commands import prefect_env
    from mathforge.config import load_preset
    from mathforge.drafter.train import evaluate_drafter
    from tasks.model import checkpoint
    from tasks.sources import resolve_model

    prefect_env()
    cfg = load_preset(args.preset)
    ckpt = checkpoint.fn(resolve_model.fn(cfg.model))
    from artifacts.store import default_store

    metrics = evaluate_drafter(default_store().path(ckpt), args.drafter_dir, cfg.drafter, device=args.device)
    _print_heldout(metrics, cfg.drafter.draft_len, cfg.drafter.top_k)
    print(json.dumps(metrics))
    return 0
