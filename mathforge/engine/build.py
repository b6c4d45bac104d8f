"""Build a torch-backend engine: validate the weights once and record what serving needs in engine.json.

The torch backend compiles nothing ahead of time, so an engine is a small description that points at
its weights by content digest (weights are never copied).
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


def build_torch_engine(
    weights_dir: Path, weights_ref: dict[str, str], variant: str, settings: dict[str, Any], out: Path
) -> dict:
    if variant == "fp8+redrafter":
        from mathforge.backends.preflight import TORCH_REDRAFTER_UNAVAILABLE

        raise UserError(TORCH_REDRAFTER_UNAVAILABLE)
    config = ModelConfig.from_pretrained(weights_dir)  # validates the architecture
    if settings["max_model_len"] > config.max_position_embeddings:
        raise UserError(
            f"engine max_model_len {settings['max_model_len']} exceeds the model's "
            f"max_position_embeddings {config.max_position_embeddings}; lower engine.max_model_len in the preset"
        )
    quantized = (weights_dir / "hf_quant_config.json").exists()
    if variant.startswith("fp8") and not quantized:
        raise UserError(f"variant {variant} needs FP8 weights but {weights_dir} has no hf_quant_config.json")
    bytes_by_dtype = weight_bytes(weights_dir)
    engine = {
        "backend": "torch",
        "variant": variant,
        "weights": weights_ref,
        "quantization": "fp8" if quantized else None,
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "weight_bytes": sum(bytes_by_dtype.values()),
        "weight_bytes_by_dtype": bytes_by_dtype,
        "build": settings,
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
