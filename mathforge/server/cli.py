"""`mathforge serve MODEL_DIR`: the torch backend behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible API (torch backend)",
        description="Serve a Hugging Face (or ModelOpt FP8) checkpoint with the torch backend: "
        "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.",
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="checkpoint directory (config.json, safetensors, tokenizer)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the checkpoint directory's name)",
    )
    p.add_argument(
        "--max-slots", type=int, default=8, help="KV-cache slots = most requests decoded at once (default: 8)"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length, prompt + output (default: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="weights/activations dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="device (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--drafter",
        metavar="DIR",
        default=None,
        help="a ReDrafter directory (Apple layout: config.json + model.safetensors) trained for this "
        "model: decode speculatively with it",
    )
    p.add_argument(
        "--draft-len",
        type=int,
        default=3,
        help="tokens the drafter proposes per step, verified in one forward (default: 3; needs --drafter)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay decode, draft and verify steps from CUDA graphs captured at startup (default: on with --device cuda)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default: warning)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import torch
    import uvicorn

    from mathforge.checkpoint import load_tokenizer
    from mathforge.engine.async_engine import AsyncEngine
    from mathforge.engine.engine import Engine
    from mathforge.errors import UserError
    from mathforge.server.app import create_app
    from mathforge.serving import exit_with_parent

    exit_with_parent()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a checkpoint directory (no config.json)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    for name, value in (
        ("--max-slots", args.max_slots),
        ("--max-model-len", args.max_model_len),
        ("--port", args.port),
    ):
        if value is not None and value < (0 if name == "--port" else 1):
            raise UserError(f"{name} must be positive, got {value}")
    drafter = None
    if args.drafter is not None:
        from mathforge.drafter.model import Drafter

        if not Path(args.drafter).is_dir():
            raise UserError(f"--drafter {args.drafter} is not a directory")
        drafter = Drafter.from_pretrained(args.drafter, device=device, dtype=getattr(torch, dtype))
    if not 1 <= args.draft_len <= 16:
        raise UserError(f"--draft-len must be between 1 and 16, got {args.draft_len}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    engine = Engine.from_pretrained(
        model_dir,
        max_slots=args.max_slots,
        max_model_len=args.max_model_len,
        dtype=dtype,
        device=device,
        drafter=drafter,
        draft_len=args.draft_len,
        cuda_graphs=args.cuda_graphs,
    )
    name = args.served_model_name or model_dir.resolve().name
    # the server's own tokenizer instance: the engine thread detokenizes with the engine's
    tokenizer = load_tokenizer(model_dir)
    app = create_app(AsyncEngine(engine), tokenizer, served_model_name=name, model_dir=str(model_dir))
    print(
        f"mathforge serve: {name} on http://{args.host}:{args.port}/v1 (device={device}, dtype={dtype}, "
        f"max_slots={engine.max_slots}, max_model_len={engine.max_model_len}"
        + (f", drafter={args.drafter}, draft_len={engine.draft_len}" if drafter is not None else "")
        + ")",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0
