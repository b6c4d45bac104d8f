"""ModelConfig: the few numbers the torch backend needs, read from a Hugging Face config.json.

Supported: Qwen2 (`qwen2`) and Llama (`llama`) decoders with SiLU MLPs and full attention. RoPE
scaling: none/"default", "linear" and "llama3"; anything else is rejected with a UserError.
Handles both the transformers<5 layout (`rope_theta`, `rope_scaling`) and the 5.x layout
(`rope_parameters = {"rope_type", "rope_theta", ...}`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mathforge.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool = False  # Llama's attention_bias also gives o_proj a bias; Qwen2's o_proj never has one
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    rope_scaling: dict[str, Any] | None = (
        None  # None = plain RoPE; else {"rope_type": "linear"|"llama3", ...}
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            arch = ", ".join(d.get("architectures") or []) or "unknown architecture"
            raise UserError(
                f"unsupported model_type {mt!r} ({arch}): the torch backend runs Qwen2 and Llama "
                f"family checkpoints only ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"unsupported hidden_act {act!r}: only SiLU (SwiGLU) MLPs are supported")
        if mt == "qwen2" and d.get("use_sliding_window"):
            raise UserError("Qwen2 with use_sliding_window=true is not supported by the torch backend")
        if mt == "llama" and d.get("mlp_bias"):
            raise UserError("Llama with mlp_bias=true is not supported by the torch backend")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            kv_heads = int(d.get("num_key_value_heads") or heads)
            head_dim = int(d.get("head_dim") or hidden // heads)
            theta, scaling = _rope(d)
            eos = d.get("eos_token_id")
            eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
            cfg = cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
                o_bias=mt == "llama" and bool(d.get("attention_bias", False)),
                bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
                eos_token_id=eos_ids,
                rope_scaling=scaling,
            )
        except KeyError as e:
            raise UserError(f"config.json lacks required field {e.args[0]!r}") from None
        if heads % kv_heads:
            raise UserError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"no config.json at {p}")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{f} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2], float32, with the configured scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        if s["rope_type"] == "linear":
            return inv / float(s["factor"])
        # llama3 (same formula as transformers' _compute_llama3_parameters)
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        return torch.where(is_medium, smoothed, inv_l)


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is None:
        return float(theta), None
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype not in _ROPE_TYPES:
        raise UserError(
            f"unsupported RoPE scaling {rtype!r}: the torch backend supports {', '.join(_ROPE_TYPES)}"
        )
    if rtype == "default":
        return float(theta), None
    need = ["factor"] + (
        ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
        if rtype == "llama3"
        else []
    )
    missing = [k for k in need if k not in scaling]
    if missing:
        raise UserError(f"RoPE scaling {rtype!r} lacks {', '.join(missing)}")
    return float(theta), {"rope_type": rtype, **{k: scaling[k] for k in need}}
