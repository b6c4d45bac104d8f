"""Fused decode kernels behind a dispatch that always has an exact eager fallback.

`mathforge.engine.model` calls these on its fast path (CUDA, bf16 activations, Triton importable). Per
layer: add_rmsnorm (residual add + RMSNorm + FP8 quantisation of the result when the next Linear is FP8),
the qkv matmul, rope_cache, decode attention (2 launches; quantises its output for an FP8 o_proj), the o
matmul, add_rmsnorm, the gate/up matmul, silu_mul (+ quantisation), the down matmul: 11 launches, no
separate quantisation or residual kernels.

Safety: each small kernel is verified on its first use with a given signature: the Triton result is
compared with the eager PyTorch computation on the same inputs (relative L2 error under `TOLERANCE`); a
kernel that fails to compile or disagrees is switched off for that signature with a warning and the eager
code runs instead, so a Triton or driver surprise costs speed, never correctness. Checks run eagerly
(never while a CUDA graph is being captured); an unchecked signature met during capture runs eagerly.

Matmuls: for each (weight kind, N, K, row bucket) with at most 64 rows (int8: any prefill size) the first
call verifies the Triton GEMV candidates against cuBLAS (`F.linear`, `torch._scaled_mm` on pre-quantised
FP8 input, dequantise + `F.linear` for int8) and times them all (L2 flushed before each call); the fastest
serves that key from then on (`choices()`). Larger row counts of bf16/fp8 (prefill) use cuBLAS. `GEMV` ("auto", "cublas", "triton"; env
MATHFORGE_GEMV) forces a side for experiments.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("mathforge.engine.kernels")

TOLERANCE = 2e-2  # relative L2 error; bf16 rounding-order differences are ~1e-3
ENABLED = os.environ.get("MATHFORGE_KERNELS", "1") != "0"
GEMV = os.environ.get("MATHFORGE_GEMV", "auto")
SKINNY_MAX_M = 64  # more rows than this: cuBLAS (bf16, fp8)
INT8_TRITON_MAX_M = 16384  # int8 up to this many rows: Triton (tiled) or dequantise + cuBLAS, the faster
ATTENTION_MAX_ROWS = 64  # T * (heads per KV head) served by the Triton decode attention
ALLOW_INTERPRETER = False  # tests: run the kernels through TRITON_INTERPRET=1 on CPU tensors
FP8 = torch.float8_e4m3fn

_ops = None
_import_error: str | None = None
_checked: dict[tuple, bool] = {}
_choice: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}
_flush: dict[torch.device, torch.Tensor] = {}


def ops():
    """The Triton module, or None when Triton cannot be imported."""
    global _ops, _import_error
    if _ops is None and _import_error is None:
        try:
            from mathforge.engine.kernels import triton_ops

            _ops = triton_ops
            _load_config_overrides(triton_ops)
        except Exception as exc:  # no triton, or a broken install: eager everywhere
            _import_error = f"{type(exc).__name__}: {exc}"
            log.info("Triton kernels unavailable (%s); using eager PyTorch", _import_error)
    return _ops


def _load_config_overrides(triton_ops) -> None:
    """MATHFORGE_GEMV_CONFIGS=path.json: [[kind, N, K, BLOCK_N, BLOCK_K, warps, stages], ...] (tuning runs)."""
    path = os.environ.get("MATHFORGE_GEMV_CONFIGS")
    if not path:
        return
    import json

    with open(path) as f:
        for kind, n, k, *cfg in json.load(f):
            triton_ops.CONFIG_OVERRIDES[(int(kind), int(n), int(k))] = tuple(int(c) for c in cfg)


def _device_ok(t: torch.Tensor) -> bool:
    if not ENABLED:
        return False
    if t.is_cuda:
        return ops() is not None
    return ALLOW_INTERPRETER and os.environ.get("TRITON_INTERPRET") == "1" and ops() is not None


def enabled_for(t: torch.Tensor) -> bool:
    """Whether the fast path may run on activations like `t` (bf16 on CUDA, or CPU under the interpreter)."""
    return t.dtype == torch.bfloat16 and _device_ok(t)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def verified(key: tuple, fast: Callable[[], object], ref: Callable[[], object]):
    """fast() once its signature `key` has been checked against ref(); ref() otherwise. Results are
    tensors or tuples of tensors (compared jointly)."""
    ok = _checked.get(key)
    if ok is True:
        return fast()
    if ok is False or _capturing():
        return ref()
    try:
        out = fast()
    except Exception as exc:
        _checked[key] = False
        log.warning("Triton kernel %s failed (%s: %s); using eager PyTorch", key, type(exc).__name__, exc)
        return ref()
    expect = ref()
    err = _rel_err(_joined(out), _joined(expect))
    _checked[key] = err <= TOLERANCE
    if not _checked[key]:
        log.warning("Triton kernel %s disagrees with eager (rel. error %.3g); using eager PyTorch", key, err)
        return expect
    return out


def _joined(out) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    return torch.cat([p.float().flatten() for p in parts])


def status() -> dict[str, bool]:
    """Every checked kernel signature and whether it passed (for benchmarks and debugging)."""
    return {"/".join(map(str, k)): v for k, v in _checked.items()}


def choices() -> dict[str, dict]:
    """The matmul implementation chosen per (kind, rows bucket, N, K, bias) and the timings it was chosen on."""
    return {"/".join(map(str, k)): {"choice": v, "us": _timings.get(k, {})} for k, v in _choice.items()}


def reset() -> None:
    """Forget every check and choice (tests)."""
    _checked.clear()
    _choice.clear()
    _timings.clear()


# ----------------------------------------------------------------------------------- norms, silu*mul
def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _quantize(h: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return h
    from mathforge.engine.fp8 import quantize_tensor

    return quantize_tensor(h, scale)


def add_rmsnorm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    norm: torch.nn.Module,
    quant_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, H] (+ delta) -> (x + delta, norm(x + delta)), the latter quantised to fp8 with `quant_scale`."""

    def ref():
        xs = x if delta is None else x + delta
        return xs, _quantize(rmsnorm_ref(xs, norm.weight, norm.eps), quant_scale)

    if not enabled_for(x):
        return ref()
    key = ("add_rmsnorm", x.shape[-1], delta is not None, quant_scale is not None)
    return verified(key, lambda: ops().add_rmsnorm(x, delta, norm.weight, norm.eps, quant_scale), ref)


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(x: torch.Tensor, quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[M, 2K] -> silu(gate) * up [M, K] (fp8 with `quant_scale`)."""

    def ref():
        return _quantize(silu_mul_ref(x), quant_scale)

    if not enabled_for(x):
        return ref()
    key = ("silu_mul", x.shape[-1], quant_scale is not None)
    return verified(key, lambda: ops().silu_mul(x, quant_scale), ref)


# ---------------------------------------------------------------------------------------------- linear
def weight_kind(mod: torch.nn.Module) -> str | None:
    """ "bf16", "fp8" or "int8" for the Linear types the model uses; None for anything else."""
    from mathforge.engine.fp8 import FP8Linear
    from mathforge.engine.int8 import Int8Linear

    if isinstance(mod, FP8Linear):
        return "fp8"
    if isinstance(mod, Int8Linear):
        return "int8"
    if type(mod) is torch.nn.Linear and mod.weight.dtype == torch.bfloat16:
        return "bf16"
    return None


def act_scale(mod: torch.nn.Module) -> torch.Tensor | None:
    """The static input scale to quantise this Linear's input with (FP8 W8A8), else None."""
    return mod.input_scale if weight_kind(mod) == "fp8" else None


def _cublas(h: torch.Tensor, mod: torch.nn.Module, kind: str | None) -> torch.Tensor:
    if kind == "fp8" and h.dtype == FP8 and h.is_cuda:
        bias = mod.bias.to(torch.bfloat16) if mod.bias is not None else None
        return torch._scaled_mm(
            h,
            mod.weight.t(),
            scale_a=mod.input_scale,
            scale_b=mod.weight_scale,
            bias=bias,
            out_dtype=torch.bfloat16,
        )
    if kind == "fp8" and h.dtype == FP8:  # CPU emulation of the same arithmetic
        y = (h.float() @ mod.weight.float().t()) * (mod.input_scale * mod.weight_scale)
        if mod.bias is not None:
            y = y + mod.bias.float()
        return y.to(torch.bfloat16)
    if kind in ("fp8", "int8"):
        return mod._eager(h)
    return mod(h)


def _triton(h: torch.Tensor, mod: torch.nn.Module, kind: str, native: bool = True) -> torch.Tensor:
    o = ops()
    if kind == "fp8":
        hq = h if h.dtype == FP8 else _quantize(h, mod.input_scale)
        return o.skinny_linear(
            hq,
            mod.weight,
            o.W_FP8,
            w_scale=mod.weight_scale,
            in_scale=mod.input_scale,
            bias=mod.bias,
            fp8_native=native,
        )
    if kind == "int8":
        return o.skinny_linear(h, mod.weight, o.W_INT8, w_scale=mod.weight_scale, bias=mod.bias)
    return o.skinny_linear(h, mod.weight, o.W_BF16, bias=mod.bias)


def _candidates(kind: str) -> dict[str, Callable]:
    c = {"triton": lambda h, m: _triton(h, m, kind)}
    if kind == "fp8":  # tensor-core fp8 dot, or both operands converted to bf16 (same products)
        c["triton_bf16dot"] = lambda h, m: _triton(h, m, kind, native=False)
    return c


def linear(h: torch.Tensor, mod: torch.nn.Module) -> torch.Tensor:
    """mod's matmul on prepared 2-D input h [M, K] (bf16; fp8 already quantised with mod.input_scale for
    an FP8 Linear) -> [M, N] bf16. Few rows: the fastest verified implementation for this shape."""
    kind = weight_kind(mod)
    M = h.shape[0]
    max_m = INT8_TRITON_MAX_M if kind == "int8" else SKINNY_MAX_M
    if kind is None or M > max_m or GEMV == "cublas" or not _device_ok(h) or h.stride(-1) != 1:
        return _cublas(h, mod, kind)
    N, K = mod.weight.shape
    bucket = max(16, 1 << (M - 1).bit_length())
    key = (kind, bucket, N, K, mod.bias is not None)
    choice = _choice.get(key)
    if choice is None:
        if _capturing():
            return _cublas(h, mod, kind)
        choice = _choose(key, h, mod, kind)
    if choice == "cublas":
        return _cublas(h, mod, kind)
    return _candidates(kind)[choice](h, mod)


def _choose(key: tuple, h: torch.Tensor, mod: torch.nn.Module, kind: str) -> str:
    """Verify the Triton candidates against cuBLAS on this input, then time every correct one."""
    expect = _cublas(h, mod, kind)
    ok: dict[str, Callable[[], torch.Tensor]] = {"cublas": lambda: _cublas(h, mod, kind)}
    for name, fn in _candidates(kind).items():
        try:
            err = _rel_err(fn(h, mod), expect)
        except Exception as exc:
            log.warning("Triton GEMV %s %s failed (%s: %s)", name, key, type(exc).__name__, exc)
            continue
        if err <= TOLERANCE:
            ok[name] = lambda fn=fn: fn(h, mod)
        else:
            log.warning("Triton GEMV %s %s disagrees with cuBLAS (rel. error %.3g)", name, key, err)
    if GEMV == "triton" or not h.is_cuda:  # forced, or the CPU interpreter: exercise Triton when correct
        choice = next((n for n in ok if n != "cublas"), "cublas")
    else:
        times = {name: _time_us(fn, h.device) for name, fn in ok.items()}
        _timings[key] = {k: round(v, 2) for k, v in times.items()}
        choice = min(times, key=times.get)
    _choice[key] = choice
    log.info("GEMV %s -> %s %s", key, choice, _timings.get(key, ""))
    return choice


def _time_us(fn: Callable[[], object], device: torch.device, reps: int = 7) -> float:
    """Median time of one call with a cold L2 (a 256 MB buffer is rewritten before each call)."""
    if device not in _flush:
        _flush[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    flush = _flush[device]
    fn()
    samples = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000)
    return statistics.median(samples)


# ------------------------------------------------------------------------------------ rope + KV cache
def rope_cache_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv: int,
) -> torch.Tensor:
    """The eager model's RoPE + cache write: q [B, T, H, D] out, k/v into cache[slot, :, pos]."""
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    cos, sin = emb.cos().to(qkv.dtype), emb.sin().to(qkv.dtype)
    q, k, v = qkv.split([n_heads * D, n_kv * D, n_kv * D], dim=-1)
    q, k, v = q.view(B, T, n_heads, D), k.view(B, T, n_kv, D), v.view(B, T, n_kv, D)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    s = slots[:, None]
    k_cache[s, :, positions] = k.to(k_cache.dtype)
    v_cache[s, :, positions] = v.to(v_cache.dtype)
    return q


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cache(qkv, positions, slots, inv_freq, k_cache, v_cache, n_heads: int, n_kv: int) -> torch.Tensor:
    args = (qkv, positions, slots, inv_freq, k_cache, v_cache, n_heads, n_kv)
    if not enabled_for(qkv) or k_cache.dtype != qkv.dtype:
        return rope_cache_ref(*args)
    D = k_cache.shape[-1]
    key = ("rope_cache", n_heads, n_kv, D)
    if _checked.get(key) is None and not _capturing():
        # check the cache writes too: what each path wrote at the (slot, position) pairs written once
        # (padding rows share a scratch slot and position: their writes race)
        s = slots[:, None].expand_as(positions).reshape(-1)
        p = positions.reshape(-1)
        pair = s * (k_cache.shape[2] + 1) + p
        once = (pair[:, None] == pair[None, :]).sum(1) == 1
        s, p = s[once], p[once]

        def with_cache(fn):
            def run():
                q = fn(*args)
                return q, k_cache[s, :, p], v_cache[s, :, p]

            return run

        verified(key, with_cache(ops().rope_cache), with_cache(rope_cache_ref))
        # the reference wrote the cache last; recompute q with whichever path is now trusted
    return verified(key, lambda: ops().rope_cache(*args), lambda: rope_cache_ref(*args))


# ----------------------------------------------------------------------------------------- attention
def attention_ref(
    q: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, k_cache, v_cache, kv_len: int
) -> torch.Tensor:
    """SDPA over cache[slot, :, :kv_len] with keys at positions <= each query's position (eager model)."""
    B, T, H, D = q.shape
    mask = (torch.arange(kv_len, device=q.device)[None, None, :] <= positions[:, :, None])[:, None]
    keys = k_cache[slots, :, :kv_len]
    values = v_cache[slots, :, :kv_len]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=H != k_cache.shape[1]
    )
    return o.transpose(1, 2).reshape(B, T, H * D)


def _attention_key(n_heads: int, n_kv: int, T: int, quant: bool) -> tuple:
    rows = T * (n_heads // n_kv)
    return ("attention", n_heads, n_kv, max(16, 1 << (rows - 1).bit_length()), quant)


def attention_fast_ok(q_like: torch.Tensor, n_heads: int, n_kv: int, T: int) -> bool:
    """Whether attention for T query tokens per row goes to the Triton kernel (then kv_len is unused)."""
    if not enabled_for(q_like) or T * (n_heads // n_kv) > ATTENTION_MAX_ROWS:
        return False
    return all(_checked.get(_attention_key(n_heads, n_kv, T, qt)) is not False for qt in (False, True))


def attention(
    q, positions, slots, k_cache, v_cache, kv_len: int, quant_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """q [B, T, H, D] -> [B, T, H * D] (fp8 with `quant_scale`)."""
    B, T, H, D = q.shape
    n_kv = k_cache.shape[1]

    def ref():
        return _quantize(attention_ref(q, positions, slots, k_cache, v_cache, kv_len), quant_scale)

    if not attention_fast_ok(q, H, n_kv, T) or k_cache.dtype != q.dtype:
        return ref()
    return verified(
        _attention_key(H, n_kv, T, quant_scale is not None),
        lambda: ops().decode_attention(q, positions, slots, k_cache, v_cache, quant_scale=quant_scale),
        ref,
    )
