"""FP8 post-training quantisation: ModelOpt FP8_DEFAULT_CFG semantics without importing ModelOpt.

Per-tensor e4m3 weights (scale = weight amax / 448) and per-tensor *static* input scales (max |input|
over the calibration set / 448) for every decoder Linear; lm_head, embeddings, norms and biases stay
BF16. As ModelOpt's export does (`preprocess_linear_fusion`), Linears that read the same input (q/k/v,
gate/up) share one input scale and one weight scale (the max over the group), so engines that fuse
them lose nothing. The output is the ModelOpt/HF layout that vLLM and TensorRT-LLM load:
`hf_quant_config.json`, `quantization_config` in config.json, and per Linear `<name>.weight`
(float8_e4m3fn), `<name>.weight_scale`, `<name>.input_scale` (float32 scalars).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mathforge import __version__
from mathforge.checkpoint import copy_non_weight_files
from mathforge.engine.fp8 import amax_to_scale, quantize_tensor
from mathforge.engine.model import Transformer, read_quant_config
from mathforge.errors import UserError

# our fused module -> the checkpoint's Linears it holds
_GROUPS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def hf_quant_config(exclude: list[str]) -> dict:
    # ModelOpt writes producer {"name": "modelopt", "version": <modelopt version>}; we name ourselves
    # honestly. Consumers (vLLM ModelOptFp8Config, TensorRT-LLM) read only the "quantization" part.
    return {
        "producer": {"name": "mathforge", "version": __version__},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": exclude},
    }


def config_quantization_config(hq: dict) -> dict:
    """config.json's `quantization_config`, as ModelOpt's convert_hf_quant_config_format (recent versions,
    compressed-tensors style) derives it from hf_quant_config.json. Older ModelOpt releases wrote
    `"quant_library": "modelopt"` instead of `"quant_method"` and had no `targets`; we follow the newer one."""
    q = hq["quantization"]
    scheme = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {
        "config_groups": {
            "group_0": {"input_activations": dict(scheme), "weights": dict(scheme), "targets": ["Linear"]}
        },
        "ignore": list(q["exclude_modules"]),
        "quant_algo": "FP8",
        "producer": hq["producer"],
        "quant_method": "modelopt",
    }


def read_calibration_texts(parquet: Path, num_samples: int | None) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(parquet, columns=["text"])
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"calibration parquet {parquet} has no readable `text` column: {e}") from None
    texts = [t for t in table.column("text").to_pylist() if t]
    if not texts:
        raise UserError(f"calibration parquet {parquet} has no non-empty texts")
    return texts[:num_samples] if num_samples else texts


@torch.no_grad()
def collect_input_amax(
    model: Transformer, token_batches: list[list[int]], progress: Callable[[int, int], None] | None = None
) -> dict[str, float]:
    """Max |input| of every decoder Linear (our fused module names), one sequence at a time."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.startswith("layers.") and isinstance(mod, torch.nn.Linear):

            def hook(_m, args, name=name):
                a = args[0].detach().abs().amax().float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        longest = max(len(t) for t in token_batches)
        model.setup_cache(1, longest)
        for i, toks in enumerate(token_batches):
            ids = torch.tensor([toks], device=model.device)
            pos = torch.arange(len(toks), device=model.device)[None]
            model(
                ids,
                pos,
                torch.zeros(1, dtype=torch.long, device=model.device),
                len(toks),
                logits_at=torch.tensor([[len(toks) - 1]], device=model.device),
            )
            if progress:
                progress(i + 1, len(token_batches))
    finally:
        for h in hooks:
            h.remove()
        model.setup_cache(0, 0)
    return {k: float(v) for k, v in amax.items()}


def calibrate_fp8(
    checkpoint_dir: Path,
    calibration_parquet: Path,
    out_dir: Path,
    *,
    num_samples: int | None = None,
    max_seq_len: int = 512,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict:
    """Calibrate a BF16 checkpoint and write its FP8 (ModelOpt layout) version into the empty `out_dir`.

    dtype of the calibration forward: float32 on CPU, bfloat16 on CUDA unless given. Returns a summary.
    """
    from mathforge.checkpoint import load_tokenizer

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if read_quant_config(checkpoint_dir) is not None:
        raise UserError(f"{checkpoint_dir} is already an FP8 checkpoint")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    texts = read_calibration_texts(Path(calibration_parquet), num_samples)
    tok = load_tokenizer(checkpoint_dir)
    # the texts are already chat-template rendered: no extra BOS/special tokens
    batches = [
        ids[:max_seq_len] for ids in (tok(t, add_special_tokens=False)["input_ids"] for t in texts) if ids
    ]

    model = Transformer.from_pretrained(checkpoint_dir, device=device, dtype=dtype)
    act = collect_input_amax(model, batches, progress)
    # per checkpoint Linear: (input_scale, weight_scale), shared within a fused group
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    w_amax: dict[str, float] = {}
    for i, layer in enumerate(model.layers):
        for fused, members in _GROUPS.items():
            name = f"layers.{i}.{fused}"
            wa = float(layer.get_submodule(fused).weight.detach().abs().amax().float())
            w_amax[name] = wa
            for m in members:
                scales[f"model.layers.{i}.{m}"] = (amax_to_scale(act[name]), amax_to_scale(wa))
    del model

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tensors(checkpoint_dir, out_dir, scales)
    hq = hf_quant_config(["lm_head"])
    (out_dir / "hf_quant_config.json").write_text(json.dumps(hq, indent=4) + "\n")
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    cfg["quantization_config"] = config_quantization_config(hq)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copy_non_weight_files(checkpoint_dir, out_dir)

    def stats(v: list[float]) -> dict:
        return {"min": min(v), "max": max(v), "mean": sum(v) / len(v)}

    return {
        "quant_algo": "FP8",
        "layers_quantized": len(scales),
        "num_samples": len(batches),
        "num_tokens": sum(len(b) for b in batches),
        "max_seq_len": max_seq_len,
        "calibration_dtype": str(dtype).removeprefix("torch."),
        "input_amax": stats(list(act.values())),
        "weight_amax": stats(list(w_amax.values())),
        "input_amax_per_module": dict(sorted(act.items())),
        "exclude_modules": ["lm_head"],
    }


def _write_tensors(src: Path, dst: Path, scales: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Rewrite every source shard as an output shard of the same name (one shard in memory at a time)."""
    index = src / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    weight_map: dict[str, str] = {}
    total = 0
    done: set[str] = set()
    for fname in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(src / fname), framework="pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                lin = key.removesuffix(".weight")
                if key.endswith(".weight") and lin in scales:
                    in_s, w_s = scales[lin]
                    out[key] = quantize_tensor(t, w_s).contiguous()
                    out[f"{lin}.weight_scale"] = w_s.clone()
                    out[f"{lin}.input_scale"] = in_s.clone()
                    done.add(lin)
                elif key.endswith("rotary_emb.inv_freq"):
                    continue
                else:
                    out[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
        save_file(out, str(dst / fname), metadata={"format": "pt"})
        for k, v in out.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if missing := sorted(set(scales) - done):
        raise UserError(f"checkpoint lacks Linear weights {missing[:5]}")
    if index.exists():
        idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / index.name).write_text(json.dumps(idx, indent=2) + "\n")
