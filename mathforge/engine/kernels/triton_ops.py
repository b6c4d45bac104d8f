"""Triton kernels for the decode step (CUDA only; imported lazily by `mathforge.engine.kernels`).

Decode at small batch is memory-bound: a step streams every weight once, so what matters is that the
weight-streaming GEMVs run near copy bandwidth and that the small per-layer work costs few launches.

* `skinny_linear`: y = x @ W^T for few rows (M <= 64) with W in bf16, FP8 e4m3 (W8A8, per-tensor static
  scales, x already quantised) or int8 (weight-only, per-output-channel scales), scale and bias epilogue.
  (Fusing RMSNorm / silu*mul / quantisation into its prologue was measured 3x slower on the H200: every
  program redoes the prologue for the whole K range on a 16-row padded tile; they live in the small kernels.)
* `add_rmsnorm`: residual add + RMSNorm (+ FP8 quantisation of the result) in one launch; `silu_mul`
  (+ quantisation) likewise, so an FP8 layer needs no separate quantisation kernels.
* `rope_cache`: RoPE on q and k from the positions, k/v written into the static cache, rotated q out.
* `decode_attention`: flash-decoding over a slot's cache for T <= 16 query tokens per row (GQA: one
  program serves every query head of a KV head), split over the sequence and merged by a second kernel
  (which quantises its output for an FP8 o_proj).
  Each query attends to cache positions <= its own position, read from `positions` on the device, so
  the launch does not depend on kv_len and one CUDA graph serves every context length.

Numerics follow the eager model: fp32 accumulation, bf16 rounding where the eager code rounds (FP8's
activation quantisation sees the same bf16 value the eager code quantises).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the Triton interpreter (TRITON_INTERPRET=1, used by the CPU tests) mishandles bf16 dots; it dots in fp32
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

W_BF16, W_FP8, W_INT8 = 0, 1, 2


@triton.jit
def _skinny_linear_kernel(
    X,
    W,
    OUT,
    BIAS,
    WSCALE,
    INSCALE,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    W_KIND: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = W + offs_n[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        if EVEN_K:
            xm = m_mask[:, None]
            wm = n_mask[:, None]
        else:
            xm = m_mask[:, None] & (offs_k[None, :] < K)
            wm = n_mask[:, None] & (offs_k[None, :] < K)
        w = tl.load(w_rows + offs_k[None, :], mask=wm, other=0.0)
        a = tl.load(x_rows + offs_k[None, :], mask=xm, other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)))
        elif W_KIND == 1 and FP8_NATIVE:
            acc += tl.dot(a, tl.trans(w))  # fp8 x fp8 tensor-core dot, fp32 accumulation
        else:
            acc += tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    if W_KIND == 1:
        acc = acc * (tl.load(INSCALE) * tl.load(WSCALE))
    if W_KIND == 2:
        acc = acc * tl.load(WSCALE + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    o_rows = OUT + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(o_rows + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=out_mask)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) by weight kind, and per (kind, N, K) where the search on the
# H200 (M = 1, OpenMath-Nemotron-14B matrices) found better ones
DEFAULT_CONFIGS: dict[int, tuple[int, int, int, int]] = {
    W_BF16: (32, 256, 4, 4),
    W_FP8: (32, 512, 4, 3),
    W_INT8: (32, 512, 4, 3),
}
LARGE_M_CONFIG = (128, 128, 8, 3)  # row tiles of 64: a plain tiled GEMM
CONFIG_OVERRIDES: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (W_BF16, 27648, 5120): (64, 256, 8, 3),
    (W_INT8, 27648, 5120): (128, 256, 8, 3),
    (W_FP8, 27648, 5120): (128, 256, 8, 3),
    (W_INT8, 5120, 5120): (64, 256, 4, 4),
    (W_FP8, 5120, 5120): (64, 256, 4, 4),
}


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    kind: int,
    *,
    w_scale: torch.Tensor | None = None,
    in_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    fp8_native: bool = True,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T -> [M, N] bf16. kind W_BF16: x bf16; W_INT8: x bf16, per-row w_scale [N];
    W_FP8: x already quantised to fp8 with `in_scale`, scalar w_scale (W8A8). Rows in tiles of <= 64 (made
    for decode; more rows work, as int8 prefill uses them, without dequantising the weight)."""
    M = x.shape[0]
    N, K = weight.shape
    assert x.shape[1] == K and x.stride(-1) == 1 and weight.stride(-1) == 1
    out = torch.empty((M, N), dtype=torch.bfloat16, device=x.device)
    if config is None and M > 64:
        config = LARGE_M_CONFIG
    bn, bk, warps, stages = config or CONFIG_OVERRIDES.get((kind, N, K)) or DEFAULT_CONFIGS[kind]
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    dummy = out
    _skinny_linear_kernel[(triton.cdiv(N, bn), triton.cdiv(M, block_m))](
        x,
        weight,
        out,
        bias if bias is not None else dummy,
        w_scale if w_scale is not None else dummy,
        in_scale if in_scale is not None else dummy,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        W_KIND=kind,
        FP8_NATIVE=fp8_native,
        HAS_BIAS=bias is not None,
        EVEN_K=K % bk == 0,
        DOT_F32=_INTERPRET,
        BLOCK_M=block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )
    return out


@triton.jit
def _add_rmsnorm_kernel(
    X,
    DELTA,
    W,
    XOUT,
    HOUT,
    QSCALE,
    N,
    stride_x,
    stride_d,
    eps,
    HAS_DELTA: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(DELTA + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + d).to(tl.bfloat16).to(tl.float32)  # the eager residual add rounds to bf16
        tl.store(XOUT + row * N + offs, x.to(XOUT.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    h = (x * rstd).to(tl.bfloat16).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    h = (h * w).to(tl.bfloat16).to(tl.float32)
    if QUANT:
        h = tl.clamp(h / tl.load(QSCALE), -448.0, 448.0)
    tl.store(HOUT + row * N + offs, h.to(HOUT.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    quant_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] (+ delta) -> (x + delta, RMSNorm(x + delta) * weight), the latter quantised to fp8 with
    `quant_scale` when given (the input of an FP8 Linear). One launch."""
    M, N = x.shape
    assert x.stride(-1) == 1 and (delta is None or delta.stride(-1) == 1)
    xout = torch.empty((M, N), dtype=x.dtype, device=x.device) if delta is not None else x
    hdtype = torch.float8_e4m3fn if quant_scale is not None else x.dtype
    hout = torch.empty((M, N), dtype=hdtype, device=x.device)
    block = triton.next_power_of_2(N)
    _add_rmsnorm_kernel[(M,)](
        x,
        delta if delta is not None else x,
        weight,
        xout,
        hout,
        quant_scale if quant_scale is not None else weight,
        N,
        x.stride(0),
        delta.stride(0) if delta is not None else 0,
        eps,
        HAS_DELTA=delta is not None,
        QUANT=quant_scale is not None,
        BLOCK_N=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return xout, hout


@triton.jit
def _silu_mul_kernel(X, OUT, QSCALE, K, stride_x, QUANT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + K + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32)
    h = (s * u).to(tl.bfloat16).to(tl.float32)
    if QUANT:
        h = tl.clamp(h / tl.load(QSCALE), -448.0, 448.0)
    tl.store(OUT + row * K + offs, h.to(OUT.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[M, 2K] (gate | up) -> silu(gate) * up [M, K] (fp8 with `quant_scale`), one launch."""
    M, K2 = x.shape
    K = K2 // 2
    assert x.stride(-1) == 1
    odtype = torch.float8_e4m3fn if quant_scale is not None else x.dtype
    out = torch.empty((M, K), dtype=odtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(M, triton.cdiv(K, block))](
        x,
        out,
        quant_scale if quant_scale is not None else x,
        K,
        x.stride(0),
        QUANT=quant_scale is not None,
        BLOCK=block,
    )
    return out


@triton.jit
def _rope_cache_kernel(
    QKV,
    POS,
    SLOTS,
    INV_FREQ,
    QOUT,
    KC,
    VC,
    T,
    stride_row,
    stride_cs,
    stride_ch,
    stride_cp,
    H: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * T + t
    b = row // T
    pos = tl.load(POS + row)
    slot = tl.load(SLOTS + b)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    freqs = pos.to(tl.float32) * tl.load(INV_FREQ + j, mask=jm, other=0.0)
    # the eager model rounds cos/sin to the activation dtype
    cos = tl.cos(freqs).to(tl.bfloat16).to(tl.float32)
    sin = tl.sin(freqs).to(tl.bfloat16).to(tl.float32)
    h = tl.arange(0, BLOCK_H)  # q heads then k heads
    hm = h < H + KVH
    m2 = hm[:, None] & jm[None, :]
    src = QKV + row * stride_row + h[:, None] * D + j[None, :]
    x1 = tl.load(src, mask=m2, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m2, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    is_q = h < H
    kvh = tl.where(is_q, 0, h - H)
    qdst = QOUT + (row * H + h[:, None]) * D + j[None, :]
    kdst = KC + slot * stride_cs + kvh[:, None] * stride_ch + pos * stride_cp + j[None, :]
    dst = tl.where(is_q[:, None], qdst, kdst)
    tl.store(dst, o1.to(QOUT.dtype.element_ty), mask=m2)
    tl.store(dst + HALF, o2.to(QOUT.dtype.element_ty), mask=m2)
    # v: copied as is
    vh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    vm = (vh[:, None] < KVH) & (d[None, :] < D)
    v = tl.load(QKV + row * stride_row + (H + KVH) * D + vh[:, None] * D + d[None, :], mask=vm, other=0.0)
    tl.store(VC + slot * stride_cs + vh[:, None] * stride_ch + pos * stride_cp + d[None, :], v, mask=vm)


def rope_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv: int,
) -> torch.Tensor:
    """qkv [B, T, (H + 2KV) * D] -> rotated q [B, T, H, D]; rotated k and v written at cache[slot, :, pos]."""
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    qkv2 = qkv.reshape(B * T, -1)
    assert qkv2.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    q = torch.empty((B, T, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    pos = positions.reshape(-1)
    half = D // 2
    _rope_cache_kernel[(B * T,)](
        qkv2,
        pos,
        slots,
        inv_freq,
        q,
        k_cache,
        v_cache,
        T,
        qkv2.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        H=n_heads,
        KVH=n_kv,
        D=D,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_H=triton.next_power_of_2(n_heads + n_kv),
        BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )
    return q


@triton.jit
def _attn_split_kernel(
    Q,
    KC,
    VC,
    POS,
    SLOTS,
    OPART,
    MLPART,
    T,
    NPROG,
    sm_scale,
    stride_cs,
    stride_ch,
    stride_cp,
    H: tl.constexpr,
    KVH: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    r = tl.arange(0, BLOCK_Q)  # query row of this KV head's group: token t = r // G, head g*G + r % G
    t = r // G
    rvalid = t < T
    qpos = tl.load(POS + b * T + t, mask=rvalid, other=-1)
    maxpos = tl.max(qpos, axis=0)
    n_chunks = maxpos // BLOCK_KV + 1
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    head = g * G + r % G
    q = tl.load(
        Q + ((b * T + t) * H + head)[:, None] * D + d[None, :], mask=rvalid[:, None] & dm[None, :], other=0.0
    )
    if DOT_F32:
        q = q.to(tl.float32)
    slot = tl.load(SLOTS + b).to(tl.int64)
    kbase = KC + slot * stride_cs + g * stride_ch
    vbase = VC + slot * stride_cs + g * stride_ch
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2
    for c in range(s, n_chunks, NPROG):
        kp = c * BLOCK_KV + tl.arange(0, BLOCK_KV)
        kmask = kp <= maxpos
        km2 = kmask[:, None] & dm[None, :]
        k = tl.load(kbase + kp[:, None] * stride_cp + d[None, :], mask=km2, other=0.0)
        v = tl.load(vbase + kp[:, None] * stride_cp + d[None, :], mask=km2, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        valid = (kp[None, :] <= qpos[:, None]) & kmask[None, :]
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    base = ((b * KVH + g) * NPROG + s) * BLOCK_Q + r
    tl.store(OPART + base[:, None] * D + d[None, :], acc, mask=dm[None, :])
    tl.store(MLPART + base * 2, m_i)
    tl.store(MLPART + base * 2 + 1, l_i)


@triton.jit
def _attn_merge_kernel(
    OPART,
    MLPART,
    POS,
    OUT,
    QSCALE,
    T,
    NPROG,
    H: tl.constexpr,
    KVH: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    QUANT: tl.constexpr,
):
    row = tl.program_id(0)  # (b * T + t) * H + h
    h = row % H
    bt = row // H
    b = bt // T
    t = bt % T
    g = h // G
    r = t * G + h % G
    qpos = tl.load(POS + bt)
    n_valid = tl.minimum(NPROG, qpos // BLOCK_KV + 1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), axis=0)
    l_run = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), axis=0)
    o_run = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_valid, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sm = s < n_valid
        base = ((b * KVH + g) * NPROG + s) * BLOCK_Q + r
        m = tl.load(MLPART + base * 2, mask=sm, other=float("-inf"))
        lv = tl.load(MLPART + base * 2 + 1, mask=sm, other=0.0)
        o = tl.load(OPART + base[:, None] * D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        w_old = tl.exp2(m_run - m_new)
        w = tl.where(sm, tl.exp2(m - m_new), 0.0)
        l_run = l_run * w_old + tl.sum(w * lv, axis=0)
        o_run = o_run * w_old + tl.sum(w[:, None] * o, axis=0)
        m_run = m_new
    o = (o_run / l_run).to(tl.bfloat16).to(tl.float32)
    if QUANT:
        o = tl.clamp(o / tl.load(QSCALE), -448.0, 448.0)
    tl.store(OUT + bt * H * D + h * D + d, o.to(OUT.dtype.element_ty), mask=dm)


_SM_COUNT: dict[int, int] = {}


def _sm_count() -> int:
    if not torch.cuda.is_available():
        return 132  # the interpreter on CPU: any number works
    dev = torch.cuda.current_device()
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT[dev]


def attention_programs(batch: int, n_kv: int, max_seq_len: int, block_kv: int) -> int:
    """Sequence splits per (row, KV head): enough programs to fill the GPU at batch 1, few at batch 32."""
    sms = _sm_count()
    want = triton.cdiv(4 * sms, max(1, batch * n_kv))
    return max(1, min(want, triton.cdiv(max_seq_len, block_kv)))


def decode_attention(
    q: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    nprog: int | None = None,
    block_kv: int = 64,
    quant_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, T, H, D] -> [B, T, H * D] (fp8 with `quant_scale`); query (b, t) attends to
    cache[slots[b], :, :positions[b, t] + 1]."""
    B, T, H, D = q.shape
    KVH = k_cache.shape[1]
    G = H // KVH
    block_q = max(16, triton.next_power_of_2(T * G))
    assert block_q <= 64, "decode_attention serves T * (H / KV) <= 64 query rows per KV head"
    if nprog is None:
        nprog = attention_programs(B, KVH, k_cache.shape[2], block_kv)
    opart = torch.empty((B, KVH, nprog, block_q, D), dtype=torch.float32, device=q.device)
    mlpart = torch.empty((B, KVH, nprog, block_q, 2), dtype=torch.float32, device=q.device)
    pos = positions.reshape(-1)
    block_d = triton.next_power_of_2(D)
    _attn_split_kernel[(B, KVH, nprog)](
        q,
        k_cache,
        v_cache,
        pos,
        slots,
        opart,
        mlpart,
        T,
        nprog,
        D**-0.5,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        H=H,
        KVH=KVH,
        G=G,
        D=D,
        BLOCK_D=block_d,
        BLOCK_Q=block_q,
        BLOCK_KV=block_kv,
        DOT_F32=_INTERPRET,
        num_warps=4,
        num_stages=2,
    )
    out_dtype = torch.float8_e4m3fn if quant_scale is not None else q.dtype
    out = torch.empty((B, T, H * D), dtype=out_dtype, device=q.device)
    _attn_merge_kernel[(B * T * H,)](
        opart,
        mlpart,
        pos,
        out,
        quant_scale if quant_scale is not None else opart,
        T,
        nprog,
        H=H,
        KVH=KVH,
        G=G,
        D=D,
        BLOCK_D=block_d,
        BLOCK_Q=block_q,
        BLOCK_KV=block_kv,
        BLOCK_S=16,
        QUANT=quant_scale is not None,
        num_warps=4,
    )
    return out
