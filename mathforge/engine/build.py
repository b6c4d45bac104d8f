"""Build a torch-backend engine: validate the weights once and record what serving needs in engine.json.

The torch backend compiles nothing ahead of time, so an engine is a small description that points at
its weights (and, for a speculative variant, its drafter) by content digest (nothing is copied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from mathforge.engine.config import ModelConfig
from mathforge.errors import UserError


def weight_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes of every tensor by dtype, read from safetensors headers (no weights loaded)."""
    totals: dict[str, int] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no .safetensors files; convert the checkpoint to safetensors first")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                dtype = sl.get_dtype()
                size = {
                    "BF16": 2,
                    "F16": 2,
                    "F32": 4,
                    "F8_E4M3": 1,
                    "I8": 1,
                    "U8": 1,
                    "I64": 8,
                    "I32": 4,
                }.get(dtype, 2)
                totals[dtype] = totals.get(dtype, 0) + numel * size
    return totals


def check_torch_drafter(drafter_dir: Path, config: ModelConfig) -> dict:
    """The drafter's config.json, checked against the base it will draft for."""
    from mathforge.drafter.model import DrafterConfig

    cfg_file = drafter_dir / "config.json"
    if not cfg_file.is_file() or not (drafter_dir / "model.safetensors").is_file():
        raise UserError(
            f"drafter {drafter_dir} is not a ReDrafter directory (config.json + model.safetensors)"
        )
    raw = json.loads(cfg_file.read_text())
    dc = DrafterConfig.from_json(raw)
    if (dc.hidden_size, dc.vocab_size) != (config.hidden_size, config.vocab_size):
        raise UserError(
            f"drafter {drafter_dir} was trained for a base with hidden_size {dc.hidden_size} and vocab_size "
            f"{dc.vocab_size}; these weights have {config.hidden_size} and {config.vocab_size}"
        )
    return raw


def build_torch_engine(
    weights_dir: Path,
    weights_ref: dict[str, str],
    variant: str,
    settings: dict[str, Any],
    out: Path,
    *,
    drafter: tuple[Path, dict[str, str]] | None = None,
    draft_len: int | None = None,
) -> dict:
    """Validate and describe one variant. A speculative variant (`<weights>+redrafter`) also names its
    drafter (directory, artifact ref) and draft_len: `engine.json` records the drafter's ref, and serving
    passes it to `mathforge serve --drafter`."""
    from mathforge.backends.preflight import is_speculative, weights_of

    speculative = is_speculative(variant)
    if speculative and (drafter is None or draft_len is None):
        raise UserError(f"variant {variant} decodes speculatively: it needs a drafter and draft_len")
    if not speculative and drafter is not None:
        raise UserError(f"variant {variant} does not decode speculatively: it takes no drafter")
    config = ModelConfig.from_pretrained(weights_dir)  # validates the architecture
    if settings["max_model_len"] > config.max_position_embeddings:
        raise UserError(
            f"engine max_model_len {settings['max_model_len']} exceeds the model's "
            f"max_position_embeddings {config.max_position_embeddings}; lower engine.max_model_len in the preset"
        )
    from mathforge.engine.model import read_quant_config

    quant = read_quant_config(weights_dir)
    quantized = {"FP8": "fp8", "W8A16": "int8_wo"}.get(quant["quant_algo"]) if quant else None
    wanted = weights_of(variant)
    if wanted in ("fp8", "int8_wo") and quantized != wanted:
        raise UserError(
            f"variant {variant} needs {wanted} weights but {weights_dir} holds "
            f"{quantized or 'unquantised'} weights"
        )
    bytes_by_dtype = weight_bytes(weights_dir)
    engine = {
        "backend": "torch",
        "variant": variant,
        "weights": weights_ref,
        "quantization": quantized,
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "weight_bytes": sum(bytes_by_dtype.values()),
        "weight_bytes_by_dtype": bytes_by_dtype,
        "build": settings,
        "drafter": None,
        "speculative": None,
    }
    if drafter is not None:
        drafter_dir, drafter_ref = drafter
        raw = check_torch_drafter(drafter_dir, config)
        engine["drafter"] = drafter_ref
        engine["drafter_bytes"] = sum(weight_bytes(drafter_dir).values())
        engine["speculative"] = {
            "method": "redrafter",
            "draft_len": int(draft_len),
            "num_beams": 1,
            "greedy_search": True,  # drafts are greedy; sampled requests are verified exactly
            "num_draft_layers": int(raw["num_draft_layers"]),
            "rnn": bool(raw["rnn"]),
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(engine, indent=2, sort_keys=True) + "\n")
    return engine


def load_engine(engine_dir: Path) -> dict:
    path = engine_dir / "engine.json"
    if not path.exists():
        raise UserError(
            f"{engine_dir} is not an engine (no engine.json); rebuild it with `mathforge pipeline`"
        )
    return json.loads(path.read_text())
