"""A plain-PyTorch Qwen2/Llama decoder (gpt-fast style): RMSNorm, RoPE, GQA attention, SwiGLU MLP.

KV cache: per layer a static [max_slots, kv_heads, max_seq_len, head_dim] buffer pair. A forward
writes its keys/values at cache[slot, :, position] and each query at position p attends to
cache[slot, :, :kv_len] masked to positions <= p, so stale entries of a reused slot are never seen.
Shapes depend only on (B, T, kv_len): no data-dependent control flow, no host syncs, CUDA-graphable.

Checkpoints: HF safetensors (single file or sharded with model.safetensors.index.json), BF16/FP16/FP32,
ModelOpt FP8 (hf_quant_config.json, quant_algo FP8) whose Linears become FP8Linear, or int8 weight-only
(quant_algo W8A16, `mathforge.engine.int8`) whose Linears become Int8Linear. q/k/v and gate/up are fused
into one Linear each at load time.

Fast path (CUDA, bf16 activations, Triton): each block runs as 11 launches: add+RMSNorm(+FP8 quant), qkv
matmul, RoPE + cache write, decode attention (2 launches; T * heads-per-KV-head <= 64; quantises for an
FP8 o_proj), o matmul, add+RMSNorm(+quant), gate/up matmul, silu*mul(+quant), down matmul
(`mathforge.engine.kernels`, each verified against this file's eager code on first use). The decode attention reads each query's position
on the device, so for those shapes the forward does not depend on kv_len (`uses_kv_len`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from mathforge.engine import kernels
from mathforge.engine.config import ModelConfig
from mathforge.engine.fp8 import FP8_DTYPE, FP8Linear, quantize_tensor
from mathforge.engine.int8 import INT8_ALGO, Int8Linear
from mathforge.errors import UserError

QUANT_KINDS = (None, "fp8", "int8_wo")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _linear(quant: str | None, i: int, o: int, bias: bool) -> nn.Module:
    if quant == "fp8":
        return FP8Linear(i, o, bias)
    if quant == "int8_wo":
        return Int8Linear(i, o, bias)
    return nn.Linear(i, o, bias=bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: str | None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.qkv_proj = _linear(
            quant, cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, cfg.qkv_bias
        )
        self.o_proj = _linear(quant, self.n_heads * self.head_dim, cfg.hidden_size, cfg.o_bias)
        # buffers (not plain attributes) so torch.compile sees the in-place cache writes as buffer mutations
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, cos, sin, slots, positions, kv_len, mask):
        B, T, _ = x.shape
        D = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_heads * D, self.n_kv * D, self.n_kv * D], dim=-1)
        q = q.view(B, T, self.n_heads, D)
        k = k.view(B, T, self.n_kv, D)
        v = v.view(B, T, self.n_kv, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # index_put with [B,1] x [B,T] advanced indices around a slice: the value is [B, T, kv, D]
        s = slots[:, None]
        self.k_cache[s, :, positions] = k.to(self.k_cache.dtype)
        self.v_cache[s, :, positions] = v.to(self.v_cache.dtype)
        keys = self.k_cache[slots, :, :kv_len]  # [B, kv, kv_len, D]
        values = self.v_cache[slots, :, :kv_len]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: str | None):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = _linear(quant, cfg.hidden_size, 2 * cfg.intermediate_size, False)
        self.down_proj = _linear(quant, cfg.intermediate_size, cfg.hidden_size, False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: str | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, quant)

    def forward(self, x, cos, sin, slots, positions, kv_len, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, positions, kv_len, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fast(self, x, delta, slots, positions, kv_len, inv_freq):
        """The same block through the fused kernels on 2-D rows: (x, delta) [B*T, H] -> (x, delta), the
        residual add of each block's MLP output deferred into the next block's first add_rmsnorm."""
        a, mlp = self.self_attn, self.mlp
        B, T = positions.shape
        x, h = kernels.add_rmsnorm(x, delta, self.input_layernorm, kernels.act_scale(a.qkv_proj))
        qkv = kernels.linear(h, a.qkv_proj)
        q = kernels.rope_cache(
            qkv.view(B, T, -1), positions, slots, inv_freq, a.k_cache, a.v_cache, a.n_heads, a.n_kv
        )
        o = kernels.attention(q, positions, slots, a.k_cache, a.v_cache, kv_len, kernels.act_scale(a.o_proj))
        attn = kernels.linear(o.view(B * T, -1), a.o_proj)
        x, h = kernels.add_rmsnorm(
            x, attn, self.post_attention_layernorm, kernels.act_scale(mlp.gate_up_proj)
        )
        gu = kernels.linear(h, mlp.gate_up_proj)
        act = kernels.silu_mul(gu, kernels.act_scale(mlp.down_proj))
        return x, kernels.linear(act, mlp.down_proj)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, fp8: bool = False, *, quant: str | None = None):
        """quant: None (plain), "fp8" (W8A8 FP8Linear) or "int8_wo" (Int8Linear); fp8=True means "fp8"."""
        super().__init__()
        quant = quant or ("fp8" if fp8 else None)
        if quant not in QUANT_KINDS:
            raise ValueError(f"quant must be one of {QUANT_KINDS}, got {quant!r}")
        self.config = config
        self.quant = quant
        self.fp8 = quant == "fp8"
        self.fast_kernels = True  # use mathforge.engine.kernels where they apply (CUDA, bf16)
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":  # on meta, normal_ imports torch._dynamo: seconds of every start
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(config, quant) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )  # lm_head always stays high precision
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", config.inv_freq(), persistent=False)
        self.max_slots = self.max_seq_len = 0

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # RoPE frequencies stay float32 whatever dtype the model is cast to
        self.inv_freq = self.config.inv_freq().to(self.inv_freq.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def setup_cache(self, max_slots: int, max_seq_len: int) -> None:
        """Allocate (or re-allocate) the static KV cache: per layer [max_slots, kv_heads, max_seq_len, head_dim]."""
        c = self.config
        shape = (max_slots, c.num_key_value_heads, max_seq_len, c.head_dim)
        for layer in self.layers:
            layer.self_attn.k_cache = None
            layer.self_attn.v_cache = None
        for layer in self.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.max_slots, self.max_seq_len = max_slots, max_seq_len

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., H] -> float32 logits [..., V]."""
        return self.lm_head(hidden).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int,
        return_hidden: bool = False,
        *,
        logits_at: torch.Tensor | None = None,
    ):
        """input_ids, positions: [B, T] int64; slots: [B] int64; kv_len: static int > max(positions).

        Returns float32 logits [B, T, V] (or [B, K, V] for the T-indices in `logits_at` [B, K]);
        with return_hidden=True, (logits, final-norm hidden states [B, T, H]).
        """
        if self.layers and self.layers[0].self_attn.k_cache is None:
            raise RuntimeError("call setup_cache(max_slots, max_seq_len) before forward")
        x = self.embed_tokens(input_ids)
        if self._fast(x):
            B, T, H = x.shape
            x2, delta = x.view(B * T, H), None
            for layer in self.layers:
                x2, delta = layer.forward_fast(x2, delta, slots, positions, kv_len, self.inv_freq)
            h = kernels.add_rmsnorm(x2, delta, self.norm)[1].view(B, T, H)
            hl = (
                h
                if logits_at is None
                else torch.gather(h, 1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
            )
            logits = self.logits(hl)
            return (logits, h) if return_hidden else logits
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, T, 1, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        # query at position p sees cache positions <= p of its own slot: [B, 1, T, kv_len]
        mask = (torch.arange(kv_len, device=x.device)[None, None, :] <= positions[:, :, None])[:, None]
        for layer in self.layers:
            x = layer(x, cos, sin, slots, positions, kv_len, mask)
        h = self.norm(x)
        hl = h if logits_at is None else torch.gather(h, 1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        logits = self.logits(hl)
        return (logits, h) if return_hidden else logits

    def _fast(self, x: torch.Tensor) -> bool:
        """The fused path, unless a module carries hooks (calibration observes each Linear's input)."""
        return (
            self.fast_kernels
            and kernels.enabled_for(x)
            and not any(m._forward_pre_hooks or m._forward_hooks for m in self.modules())
        )

    def uses_kv_len(self, num_tokens: int) -> bool:
        """Whether a forward of `num_tokens` tokens per row depends on the kv_len argument (its shapes do).
        False on the fast path whose decode attention reads positions on the device: a CUDA graph
        captured at one kv_len then serves every kv_len."""
        c = self.config
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return not (
            self.fast_kernels
            and kernels.enabled_for(probe)
            and kernels.attention_fast_ok(probe, c.num_attention_heads, c.num_key_value_heads, num_tokens)
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> Transformer:
        path = Path(path)
        config = ModelConfig.from_pretrained(path)
        qc = read_quant_config(path)
        quant = None if qc is None else ("fp8" if qc["quant_algo"] == "FP8" else "int8_wo")
        tensors = load_safetensors(path, device)  # straight onto the target device
        with torch.device("meta"):
            model = cls(config, quant=quant)
        sd = _convert_state_dict(config, tensors, quant, dtype)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise UserError(
                f"checkpoint {path} does not match a {config.model_type} model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = config.inv_freq()
        return model.to(device).eval().requires_grad_(False)


def read_quant_config(path: Path) -> dict | None:
    """{"quant_algo": "FP8" | "W8A16", "exclude_modules": [...]} for a ModelOpt FP8 or an int8 weight-only
    checkpoint, None for a plain one.

    Reads hf_quant_config.json, or else config.json's quantization_config with quant_method "modelopt"."""
    f = path / "hf_quant_config.json"
    if f.exists():
        q = json.loads(f.read_text()).get("quantization", {})
        algo, kv, exclude = q.get("quant_algo"), q.get("kv_cache_quant_algo"), q.get("exclude_modules")
    else:
        q = json.loads((path / "config.json").read_text()).get("quantization_config")
        if not q:
            return None
        f = path / "config.json"
        if q.get("quant_method") != "modelopt":
            raise UserError(
                f"{f}: quantization_config with quant_method {q.get('quant_method')!r} is not supported; "
                f"the torch backend loads plain or ModelOpt FP8 checkpoints"
            )
        algo, kv, exclude = q.get("quant_algo"), q.get("kv_cache_scheme"), q.get("ignore")
    if algo not in ("FP8", INT8_ALGO):
        raise UserError(
            f"{f}: quant_algo {algo!r} is not supported (per-tensor 'FP8', or '{INT8_ALGO}' int8 weight-only)"
        )
    if kv not in (None, "FP8") and not (isinstance(kv, dict) and kv.get("num_bits") == 8):
        raise UserError(f"{f}: KV-cache quantisation {kv!r} is not supported")
    return {"quant_algo": algo, "exclude_modules": list(exclude or ["lm_head"])}


def load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt", device=_st_device(device)) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _st_device(device: str | torch.device) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(d)


def _convert_state_dict(
    cfg: ModelConfig, t: dict[str, torch.Tensor], quant: str | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """HF names -> ours: fuse q/k/v and gate/up, cast floats to dtype, keep fp8/int8 weights + fp32 scales."""
    t = {k.removeprefix("model."): v for k, v in t.items()}
    sd: dict[str, torch.Tensor] = {}
    fp8 = quant == "fp8"

    def fused(dst: str, srcs: list[str], bias: bool):
        quantized = quant is not None and f"{srcs[0]}.weight_scale" in t
        if quantized and quant == "int8_wo":
            # per-output-channel scales: fusing is concatenation, exact
            ws = [t.pop(f"{s}.weight_scale").float().reshape(-1) for s in srcs]
            ws_rows = [t[f"{s}.weight"].shape[0] for s in srcs]
            if ws_rows != [w.numel() for w in ws] or any(t[f"{s}.weight"].dtype != torch.int8 for s in srcs):
                raise UserError(
                    f"{srcs[0]}: int8 weight-only needs int8 weights with one scale per output row"
                )
            sd[f"{dst}.weight"] = torch.cat([t.pop(f"{s}.weight") for s in srcs])
            sd[f"{dst}.weight_scale"] = torch.cat(ws)
        elif quantized:
            ws = [t.pop(f"{s}.weight_scale").float().reshape(()) for s in srcs]
            ins = [t.pop(f"{s}.input_scale").float().reshape(()) for s in srcs]
            w_scale = torch.stack(ws).max()
            # shards with different weight scales are requantised to the largest (as vLLM does); our
            # own calibration writes one shared scale per fused group, so this is then exact
            w = torch.cat(
                [
                    t.pop(f"{s}.weight")
                    if torch.equal(sc, w_scale)
                    else quantize_tensor(t.pop(f"{s}.weight").float() * sc, w_scale)
                    for s, sc in zip(srcs, ws, strict=True)
                ]
            )
            sd[f"{dst}.weight"] = w.to(FP8_DTYPE)
            sd[f"{dst}.weight_scale"] = w_scale
            sd[f"{dst}.input_scale"] = torch.stack(ins).max()
        else:
            if quant is not None:
                raise UserError(
                    f"{'FP8' if fp8 else 'int8'} checkpoint lacks {srcs[0]}.weight_scale: only checkpoints "
                    f"with every decoder Linear quantised (lm_head excluded) are supported"
                )
            sd[f"{dst}.weight"] = torch.cat([t.pop(f"{s}.weight").to(dtype) for s in srcs])
        if bias:
            sd[f"{dst}.bias"] = torch.cat([t.pop(f"{s}.bias").to(dtype) for s in srcs])

    try:
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}"
            fused(f"{p}.self_attn.qkv_proj", [f"{p}.self_attn.{n}_proj" for n in "qkv"], cfg.qkv_bias)
            fused(f"{p}.self_attn.o_proj", [f"{p}.self_attn.o_proj"], cfg.o_bias)
            fused(f"{p}.mlp.gate_up_proj", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], False)
            fused(f"{p}.mlp.down_proj", [f"{p}.mlp.down_proj"], False)
            for n in ("input_layernorm", "post_attention_layernorm"):
                sd[f"{p}.{n}.weight"] = t.pop(f"{p}.{n}.weight").to(dtype)
        sd["embed_tokens.weight"] = t.pop("embed_tokens.weight").to(dtype)
        sd["norm.weight"] = t.pop("norm.weight").to(dtype)
    except KeyError as e:
        raise UserError(f"checkpoint lacks tensor {e.args[0]!r}") from None
    if "lm_head.weight" in t:
        lm = t.pop("lm_head.weight")
        if not cfg.tie_word_embeddings:
            sd["lm_head.weight"] = lm.to(dtype)
    elif not cfg.tie_word_embeddings:
        raise UserError("checkpoint lacks lm_head.weight and tie_word_embeddings is false")
    # tolerated leftovers: rotary buffers of old exports, FP8 KV-cache scales (the KV cache stays in model dtype)
    leftovers = [k for k in t if not k.endswith(("rotary_emb.inv_freq", "k_scale", "v_scale"))]
    if leftovers:
        raise UserError(f"checkpoint has unexpected tensors: {leftovers[:5]}")
    return sd
