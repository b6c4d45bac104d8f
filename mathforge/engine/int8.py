"""int8 weight-only (W8A16) linear layers: per-output-channel symmetric scales, no calibration.

The variant for GPUs without FP8 tensor cores: weights are half the bytes of BF16, activations stay BF16,
so a memory-bound decode step streams half the bytes. Quantisation: scale[n] = max|W[n, :]| / 127,
q = round(W / scale) clamped to ±127 (symmetric, zero-point free); y = (x @ q^T) * scale + bias.

Kernels (CUDA): a Triton GEMV/GEMM that dequantises in registers (`mathforge.engine.kernels`), or the
weight dequantised to BF16 and multiplied with cuBLAS, whichever measured faster for the shape (on the
H200 the Triton kernel, 7-20x faster at decode sizes, 1.5x at prefill). On CPU: an fp32 matmul of the
int8 values (exact products) with the same scale/bias epilogue.

Checkpoint layout (what `quantize_int8_checkpoint` writes and the loader reads): the source checkpoint's
tensors with every decoder Linear's `<name>.weight` stored as int8 [N, K] plus `<name>.weight_scale`
float32 [N]; `hf_quant_config.json` with quant_algo "W8A16" (TensorRT-LLM's name for int8 weight-only),
lm_head, embeddings, norms and biases unquantised (BF16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mathforge.checkpoint import copy_non_weight_files
from mathforge.engine.fp8 import KernelLinear
from mathforge.errors import UserError

INT8_ALGO = "W8A16"
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float32 scale [N]) with w ≈ q * scale[:, None]."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(KernelLinear):
    """y = (x @ W_int8^T) * weight_scale + bias, output in x's dtype."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, *, device=None, dtype=torch.bfloat16
    ):
        super().__init__(in_features, out_features, bias, weight_dtype=torch.int8, device=device, dtype=dtype)
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        q, scale = quantize_per_channel(weight)
        m = cls(
            weight.shape[1],
            weight.shape[0],
            bias is not None,
            device=weight.device,
            dtype=bias.dtype if bias is not None else torch.bfloat16,
        )
        m.weight.data = q
        m.weight_scale.data = scale
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def _eager(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.is_cuda:
            # compute-bound sizes: one dequantised BF16 copy of the weight, then cuBLAS
            y = torch.nn.functional.linear(x2, self.dequantized(x2.dtype))
            y = y.float()
        else:
            y = (x2.float() @ self.weight.float().t()) * self.weight_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x2.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 weight-only"


def hf_quant_config_int8() -> dict:
    from mathforge import __version__

    return {
        "producer": {"name": "mathforge", "version": __version__},
        "quantization": {
            "quant_algo": INT8_ALGO,
            "kv_cache_quant_algo": None,
            "exclude_modules": ["lm_head"],
        },
    }


def is_decoder_linear_weight(key: str) -> bool:
    """model.layers.<i>.(self_attn|mlp).<proj>.weight"""
    parts = key.split(".")
    return key.endswith(".weight") and "layers" in parts and len(parts) >= 3 and parts[-2] in _LINEARS


def quantize_int8_checkpoint(checkpoint_dir: Path, out_dir: Path) -> dict:
    """Write the int8 weight-only version of a BF16/FP32 HF checkpoint into `out_dir` (one source shard in
    memory at a time). Returns a summary: Linears quantised, bytes, worst relative weight error."""
    from mathforge.engine.model import read_quant_config

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise UserError(f"{checkpoint_dir} is not a checkpoint directory (no config.json)")
    if read_quant_config(checkpoint_dir) is not None:
        raise UserError(
            f"{checkpoint_dir} is already quantised; int8 weight-only needs a BF16/FP32 checkpoint"
        )
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (checkpoint_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UserError(f"no model.safetensors or model.safetensors.index.json in {checkpoint_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = quantised = 0
    worst = 0.0
    for fname in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(checkpoint_dir / fname), framework="pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                if is_decoder_linear_weight(key):
                    q, scale = quantize_per_channel(t)
                    err = float(
                        (q.float() * scale[:, None] - t.float()).norm() / t.float().norm().clamp_min(1e-12)
                    )
                    worst = max(worst, err)
                    out[key] = q.contiguous()
                    out[key.removesuffix(".weight") + ".weight_scale"] = scale.contiguous()
                    quantised += 1
                else:
                    out[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
        save_file(out, str(out_dir / fname), metadata={"format": "pt"})
        for k, v in out.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if quantised == 0:
        raise UserError(f"{checkpoint_dir} has no decoder Linear weights (model.layers.<i>.*_proj.weight)")
    if index.exists():
        idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / index.name).write_text(json.dumps(idx, indent=2) + "\n")
    hq = hf_quant_config_int8()
    (out_dir / "hf_quant_config.json").write_text(json.dumps(hq, indent=4) + "\n")
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": INT8_ALGO,
        "ignore": ["lm_head"],
        "producer": hq["producer"],
    }
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copy_non_weight_files(checkpoint_dir, out_dir)
    return {
        "quant_algo": INT8_ALGO,
        "layers_quantized": quantised,
        "bytes": total,
        "max_relative_weight_error": worst,
        "exclude_modules": ["lm_head"],
    }
