"""`mathforge bench-engine`: decode and prefill speed of the torch backend against the bandwidth limit.

A model of any Hugging Face config (default: the OpenMath-Nemotron-14B shape) is instantiated with random
weights directly on the device for each variant (bf16, fp8 W8A8 per-tensor, int8 weight-only). Random
weights do not change how long dense kernels take (no sparsity is exploited; values are random, never
zeros), so the timings are those of the real checkpoint.

Per variant: decode step time at each batch size (one forward of B rows at context C, served as the engine
serves it: CUDA-graph replay when on CUDA), aggregate tok/s, and the bandwidth limit of that step:
(weight bytes + KV-cache bytes read per step) / copy bandwidth measured in the same run; the reported
fraction is limit time / measured time. Prefill: one forward of `--prefill-tokens` tokens. Optional:
a GEMV table (the step's matmul shapes at M = 1..32 for cuBLAS bf16, cuBLASLt FP8 `_scaled_mm` and the
Triton kernels), a torch.profiler breakdown of one step, and a torch.compile(mode="reduce-overhead")
comparison on a model cut to a few layers.

`--save DIR` writes the random-weight model as an HF checkpoint (tokenizer of the embedded tiny model;
lm_head rows past that tokenizer's vocabulary are zero so generated ids decode to text) for end-to-end
`mathforge serve` + `mathforge bench` runs on the same shape.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathforge.bench.cli import positive_ints
from mathforge.errors import UserError

if TYPE_CHECKING:
    import torch

    from mathforge.engine.config import ModelConfig

# torch and the engine are imported inside the functions: `mathforge --help` stays fast

SHAPES: dict[str, dict[str, Any]] = {
    # nvidia/OpenMath-Nemotron-14B (Qwen2.5-14B architecture)
    "openmath-14b": dict(
        model_type="qwen2",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # nvidia/OpenMath-Nemotron-1.5B (Qwen2.5-Math-1.5B architecture)
    "openmath-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
VARIANTS = ("bf16", "fp8", "int8_wo")
_QUANT = {"bf16": None, "fp8": "fp8", "int8_wo": "int8_wo"}
NOTE = (
    "random weights: dense-kernel time does not depend on weight values (no sparsity is exploited; "
    "values are random, never zeros), so these timings hold for the real checkpoint of this shape"
)


# ------------------------------------------------------------------------------------------ config
def load_shape(spec: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A named shape, an HF config.json (or its directory); then KEY=VALUE overrides (JSON values)."""

    from mathforge.engine.config import ModelConfig

    if spec in SHAPES:
        d = dict(SHAPES[spec])
    elif spec == "tiny":
        from mathforge.config import EMBEDDED_MODELS

        d = json.loads((EMBEDDED_MODELS["tiny"] / "config.json").read_text())
    else:
        p = Path(spec)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise UserError(
                f"--config {spec!r} is neither a shape ({', '.join([*SHAPES, 'tiny'])}) nor a config.json"
            )
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{f} is not valid JSON: {e}") from None
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            d[k] = json.loads(v)
        except json.JSONDecodeError:
            d[k] = v
    ModelConfig.from_dict(d)  # validate
    return d


# ------------------------------------------------------------------------------------ random model
def random_model(cfg: ModelConfig, variant: str, device: str | torch.device, seed: int = 0):
    """A Transformer of `cfg` with random weights made on `device` (bf16 activations; fp8/int8 Linears
    quantised from N(0, 0.02) draws, scales as a real quantiser would set them)."""
    import torch

    from mathforge.engine.fp8 import FP8_DTYPE, FP8_MAX
    from mathforge.engine.int8 import Int8Linear
    from mathforge.engine.model import Transformer

    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    device = torch.device(device)
    with torch.device("meta"):
        m = Transformer(cfg, quant=_QUANT[variant])
    m = m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    std = 0.02
    for name, mod in m.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p.dtype == FP8_DTYPE:
                # amax of N(0, std) draws ~ 5 std: weight_scale = 5 std / 448
                ws = 5 * std / FP8_MAX
                for r0 in range(0, p.shape[0], 4096):
                    r = torch.randn((min(4096, p.shape[0] - r0), p.shape[1]), generator=g, device=device)
                    p.data[r0 : r0 + 4096] = (r * (std / ws)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            elif p.dtype == torch.int8:
                p.data.copy_(torch.randint(-127, 128, p.shape, generator=g, device=device, dtype=torch.int8))
            elif pname == "weight_scale" and isinstance(mod, Int8Linear):
                p.data.fill_(5 * std / 127)
            elif pname == "weight_scale":
                p.data.fill_(5 * std / FP8_MAX)
            elif pname == "input_scale":
                p.data.fill_(6.0 / FP8_MAX)  # RMSNorm outputs ~ N(0, 1): amax ~ 6
            elif "norm" in full:
                p.data = torch.ones(p.shape, dtype=torch.bfloat16, device=device)
            else:
                p.data = (torch.randn(p.shape, generator=g, device=device) * std).to(torch.bfloat16)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.embed_tokens.weight
    m.inv_freq = cfg.inv_freq().to(device)
    return m.eval().requires_grad_(False)


def weight_bytes_per_step(model, batch: int) -> int:
    """Bytes a decode step reads for weights: every decoder Linear (+scales, biases, norms), the final
    norm, the lm_head and `batch` embedding rows."""

    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "embed_tokens.weight" and model.lm_head.weight is not p:
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def matmul_params(model) -> int:
    """Weights that multiply every token (decoder Linears and lm_head): 2 x this = FLOPs per token."""

    n = model.lm_head.weight.numel()
    for layer in model.layers:
        for mod in (
            layer.self_attn.qkv_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        ):
            n += mod.weight.numel()
    return n


def kv_bytes_per_step(cfg: ModelConfig, batch: int, context: int, elsize: int = 2) -> int:
    """Keys and values of `context` positions for each of `batch` rows, every layer."""

    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * context * cfg.head_dim * elsize


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any], device: torch.device, *, iters: int, repeats: int = 5, warmup: int = 1
) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls (CUDA events on a GPU; on a
    CPU, where the command is a functional check rather than a measurement, one sample)."""
    import torch

    if device.type != "cuda":
        repeats, warmup, iters = 1, min(warmup, 1), min(iters, 2)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1000 / iters)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch

    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=10 if device.type == "cuda" else 3)
    return 2 * n * 4 / (ms / 1000)


# ------------------------------------------------------------------------------------------ decode
def bench_decode(
    model,
    cfg: ModelConfig,
    batch: int,
    context: int,
    *,
    graphs: bool,
    iters: int,
    seed: int = 1,
    tokens: int = 1,
):
    """Step time of a decode forward of `batch` rows whose last token sits at position context - 1; with
    tokens > 1 a speculative verify forward (`tokens` per row, hidden states returned)."""
    import torch

    from mathforge.engine.graphs import CUDAGraphRunner

    dev = model.device
    model.setup_cache(batch + 1, context + 64)
    g = torch.Generator(device=dev).manual_seed(seed)
    for layer in model.layers:  # random keys/values, never zeros
        for c in (layer.self_attn.k_cache, layer.self_attn.v_cache):
            c.copy_(torch.randn(c.shape, generator=g, device=dev).to(c.dtype))
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g, device=dev)
    pos = (torch.arange(context - tokens, context, device=dev)[None]).expand(batch, -1).contiguous()
    slots = torch.arange(batch, device=dev)
    kv_len = min(-(-context // 128) * 128, context + 64)
    runner = model
    if graphs and dev.type == "cuda":
        runner = CUDAGraphRunner(model, batch_sizes=[batch], token_counts=[tokens])
    hidden = tokens > 1
    ms = time_ms(lambda: runner(ids, pos, slots, kv_len, hidden), dev, iters=iters, warmup=2)
    out = runner(ids, pos, slots, kv_len, hidden)
    logits = out[0] if hidden else out
    finite = bool(torch.isfinite(logits).all())
    return ms, finite


def bench_draft(
    model, cfg: ModelConfig, batch: int, k: int, layers: int, *, graphs: bool, iters: int
) -> float:
    """Step time of a ReDrafter drafter of this base's shape (random weights, `layers` ResBlocks) drafting
    k greedy tokens for `batch` rows, as the engine calls it: from a CUDA graph when `graphs`."""
    import torch

    from mathforge.drafter.model import Drafter, DrafterConfig
    from mathforge.engine.graphs import GraphedFunction

    dev, dtype = model.device, model.embed_tokens.weight.dtype
    torch.manual_seed(0)
    with torch.device(dev):  # initialised where it runs: a 14B drafter's lm_head is 1.6B parameters
        drafter = Drafter(DrafterConfig.for_base(cfg, num_draft_layers=layers)).to(dtype).eval()
    hidden = torch.randn(batch, cfg.hidden_size, device=dev, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device=dev)

    def draft(h, t):
        return drafter.draft(h, t, model.embed_tokens, k)

    call = GraphedFunction(draft) if graphs and dev.type == "cuda" else draft
    with torch.inference_mode():
        return time_ms(lambda: call(hidden, tokens), dev, iters=iters, warmup=2)


def bench_prefill(model, cfg: ModelConfig, tokens: int, *, iters: int = 3) -> float:
    import torch

    dev = model.device
    model.setup_cache(2, tokens + 64)
    g = torch.Generator(device=dev).manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=g, device=dev)
    pos = torch.arange(tokens, device=dev)[None]
    slots = torch.zeros(1, dtype=torch.long, device=dev)
    last = torch.tensor([[tokens - 1]], device=dev)
    kv_len = min(-(-tokens // 128) * 128, tokens + 64)
    return time_ms(lambda: model(ids, pos, slots, kv_len, logits_at=last), dev, iters=iters, repeats=3)


def profile_step(model, cfg: ModelConfig, batch: int, context: int, rows: int = 20) -> dict[str, Any]:
    """torch.profiler over graph replays of one decode step: kernel table and time by kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mathforge.engine.graphs import CUDAGraphRunner

    dev = model.device
    model.setup_cache(batch + 1, context + 64)
    ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
    pos = torch.full((batch, 1), context - 1, dtype=torch.long, device=dev)
    slots = torch.arange(batch, device=dev)
    kv_len = min(-(-context // 128) * 128, context + 64)
    runner = CUDAGraphRunner(model, batch_sizes=[batch])
    for _ in range(3):
        runner(ids, pos, slots, kv_len)
    _sync(dev)
    steps = 5
    out: dict[str, Any] = {"batch": batch, "context": context}
    for mode, fn in (
        ("graph", lambda: runner(ids, pos, slots, kv_len)),
        ("eager", lambda: model(ids, pos, slots, kv_len)),
    ):
        fn()
        _sync(dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            _sync(dev)
        kinds: dict[str, float] = {}
        total = 0.0
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            if t <= 0 or e.key.startswith(("cudaGraph", "cudaLaunch", "cudaDevice", "cudaStream")):
                continue
            kind = _kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + t / steps / 1000
            total += t / steps / 1000
        try:
            table = prof.key_averages().table(sort_by="device_time_total", row_limit=rows)
        except Exception:
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
        out[mode] = {
            "kernel_ms_per_step": round(total, 4),
            "ms_by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "table": table,
        }
    return out


def _kernel_kind(name: str) -> str:
    n = name.lower()
    for key, kind in (
        ("skinny_linear", "gemv (triton)"),
        ("attn_split", "attention"),
        ("attn_merge", "attention"),
        ("rope_cache", "rope + kv write"),
        ("rmsnorm", "rmsnorm"),
        ("silu", "silu*mul"),
        ("splitkreduce", "gemm/gemv (cublas)"),
        ("gemv", "gemm/gemv (cublas)"),
        ("gemm", "gemm/gemv (cublas)"),
        ("cutlass", "gemm/gemv (cublas)"),
        ("nvjet", "gemm/gemv (cublas)"),
        ("sm90", "gemm/gemv (cublas)"),
        ("flash", "attention"),
        ("fmha", "attention"),
        ("efficient_attention", "attention"),
        ("index", "embedding/indexing"),
        ("copy", "copies"),
        ("memcpy", "copies"),
    ):
        if key in n:
            return kind
    return "other elementwise"


# --------------------------------------------------------------------------------------- GEMV table
def gemv_table(cfg: ModelConfig, device: torch.device, ms_list=(1, 8, 16, 32)) -> list[dict[str, Any]]:
    """Each decode matmul shape at M rows: µs and weight-stream GB/s for cuBLAS bf16, cuBLASLt FP8
    (`_scaled_mm`, tensor-wise scales, activation pre-quantised), and the Triton kernels (bf16; fp8 W8A8
    on pre-quantised input with a tensor-core fp8 dot or a bf16 dot of converted operands; int8
    weight-only). Timed as CUDA-graph replays over enough weight copies
    that nothing is served from L2."""
    import torch

    from mathforge.engine import kernels

    ops = kernels.ops()
    H, inter = cfg.hidden_size, cfg.intermediate_size
    D = cfg.head_dim
    shapes = {
        "qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D, H),
        "o": (H, cfg.num_attention_heads * D),
        "gate_up": (2 * inter, H),
        "down": (H, inter),
    }
    rows = []
    for name, (N, K) in shapes.items():
        copies = max(2, math.ceil(512e6 / (N * K)))  # >= 512 MB of fp8 weights: well past the 60 MB L2
        w = {
            "bf16": [(torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16) for _ in range(copies)],
            "int8": [
                torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8) for _ in range(copies)
            ],
        }
        w["fp8"] = [(b.float() / (0.1 / 448)).clamp(-448, 448).to(torch.float8_e4m3fn) for b in w["bf16"]]
        scales = {
            "ws": torch.tensor(0.1 / 448, device=device),
            "wsc": torch.full((N,), 0.02 / 127, device=device),
            "ins": torch.tensor(4.0 / 448, device=device),
        }
        for M in ms_list:
            row: dict[str, Any] = {"matrix": name, "N": N, "K": K, "M": M}
            x = torch.randn(M, K, device=device).to(torch.bfloat16)
            for cname, elsize in _GEMV_CANDIDATES:
                if cname.startswith("triton") and (ops is None or M > 64):
                    continue
                fn = _gemv_call(cname, x, w, scales, ops)
                try:
                    us = _graph_time_us(lambda fn=fn, n=copies: [fn(i) for i in range(n)], device) / copies
                    row[cname + "_us"] = round(us, 2)
                    row[cname + "_GBps"] = round(N * K * elsize / (us * 1e-6) / 1e9, 1)
                except Exception as exc:  # report, do not abort the table
                    row[cname + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
        del w
        torch.cuda.empty_cache()
    return rows


_GEMV_CANDIDATES = (
    ("cublas_bf16", 2),
    ("scaled_mm_fp8", 1),
    ("triton_bf16", 2),
    ("triton_fp8", 1),
    ("triton_fp8_bf16dot", 1),
    ("triton_int8", 1),
)


def _gemv_call(name: str, x, w: dict, sc: dict, ops) -> Callable[[int], Any]:
    """One candidate GEMV as a function of the weight copy index (what the GEMV table times)."""
    import torch

    if name == "cublas_bf16":
        return lambda i: torch.nn.functional.linear(x, w["bf16"][i])
    if name == "scaled_mm_fp8":
        xq = (x.float() / sc["ins"]).clamp(-448, 448).to(torch.float8_e4m3fn)
        return lambda i: torch._scaled_mm(
            xq, w["fp8"][i].t(), scale_a=sc["ins"], scale_b=sc["ws"], out_dtype=torch.bfloat16
        )
    if name == "triton_bf16":
        return lambda i: ops.skinny_linear(x, w["bf16"][i], 0)
    if name.startswith("triton_fp8"):
        xq = (x.float() / sc["ins"]).clamp(-448, 448).to(torch.float8_e4m3fn)
        native = name == "triton_fp8"
        return lambda i: ops.skinny_linear(
            xq, w["fp8"][i], 1, w_scale=sc["ws"], in_scale=sc["ins"], fp8_native=native
        )
    return lambda i: ops.skinny_linear(x, w["int8"][i], 2, w_scale=sc["wsc"])


def _graph_time_us(fn: Callable[[], Any], device: torch.device, reps: int = 20) -> float:
    import torch

    fn()  # compile / warm up
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(samples)


# -------------------------------------------------------------------------------- compile compare
def compare_compile(shape: dict[str, Any], layers: int, context: int, device: torch.device) -> dict[str, Any]:
    """BF16 batch-1 decode of the shape cut to `layers` layers: torch.compile(mode="reduce-overhead",
    fullgraph=True) of the eager forward vs the fused kernels + manual CUDA graph (our runner)."""
    import torch

    from mathforge.engine.config import ModelConfig
    from mathforge.engine.graphs import CUDAGraphRunner

    cfg = ModelConfig.from_dict({**shape, "num_hidden_layers": layers})
    model = random_model(cfg, "bf16", device)
    model.setup_cache(2, context + 64)
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    pos = torch.full((1, 1), context - 1, dtype=torch.long, device=device)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    kv_len = min(-(-context // 128) * 128, context + 64)
    out: dict[str, Any] = {"layers": layers, "context": context, "batch": 1}
    runner = CUDAGraphRunner(model, batch_sizes=[1])
    t0 = time.perf_counter()
    runner(ids, pos, slots, kv_len)
    runner(ids, pos, slots, kv_len)
    _sync(device)
    out["graph_runner_setup_s"] = round(time.perf_counter() - t0, 2)
    out["graph_runner_step_ms"] = round(time_ms(lambda: runner(ids, pos, slots, kv_len), device, iters=50), 4)
    model.fast_kernels = False
    eager_graph = CUDAGraphRunner(model, batch_sizes=[1])
    eager_graph(ids, pos, slots, kv_len)
    out["eager_ops_graph_step_ms"] = round(
        time_ms(lambda: eager_graph(ids, pos, slots, kv_len), device, iters=50), 4
    )
    try:
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        t0 = time.perf_counter()
        for _ in range(3):
            compiled(ids, pos, slots, kv_len)
        _sync(device)
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["compile_step_ms"] = round(
            time_ms(lambda: compiled(ids, pos, slots, kv_len), device, iters=50), 4
        )
    except Exception as exc:
        out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    model.fast_kernels = True
    return out


# ------------------------------------------------------------------------------------------- save
def save_random_checkpoint(shape: dict[str, Any], out: Path, *, device: str = "cpu", seed: int = 0) -> Path:
    """Write a random-weight HF checkpoint of `shape` (bf16 safetensors, HF tensor names, the embedded tiny
    model's tokenizer; lm_head rows past that tokenizer's vocabulary zeroed so outputs decode to text)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from mathforge.config import EMBEDDED_MODELS
    from mathforge.engine.config import ModelConfig

    cfg = ModelConfig.from_dict(shape)
    out.mkdir(parents=True, exist_ok=True)
    tiny = EMBEDDED_MODELS["tiny"]
    tok_vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s: int) -> torch.Tensor:
        return (torch.randn(s, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    H, inter, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(cfg.vocab_size, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        t[f"{p}.self_attn.q_proj.weight"] = rnd(cfg.num_attention_heads * D, H)
        t[f"{p}.self_attn.k_proj.weight"] = rnd(cfg.num_key_value_heads * D, H)
        t[f"{p}.self_attn.v_proj.weight"] = rnd(cfg.num_key_value_heads * D, H)
        if cfg.qkv_bias:
            t[f"{p}.self_attn.q_proj.bias"] = rnd(cfg.num_attention_heads * D)
            t[f"{p}.self_attn.k_proj.bias"] = rnd(cfg.num_key_value_heads * D)
            t[f"{p}.self_attn.v_proj.bias"] = rnd(cfg.num_key_value_heads * D)
        t[f"{p}.self_attn.o_proj.weight"] = rnd(H, cfg.num_attention_heads * D)
        t[f"{p}.mlp.gate_proj.weight"] = rnd(inter, H)
        t[f"{p}.mlp.up_proj.weight"] = rnd(inter, H)
        t[f"{p}.mlp.down_proj.weight"] = rnd(H, inter)
        t[f"{p}.input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    head = t["model.embed_tokens.weight"] if cfg.tie_word_embeddings else rnd(cfg.vocab_size, H)
    head[tok_vocab:] = 0  # with tied embeddings this zeroes those embedding rows too: never fed anyway
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = head
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        **shape,
        "architectures": ["Qwen2ForCausalLM" if cfg.model_type == "qwen2" else "LlamaForCausalLM"],
    }
    config.update(
        {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id or None,
            "torch_dtype": "bfloat16",
        }
    )
    tiny_cfg = json.loads((tiny / "config.json").read_text())
    config["bos_token_id"], config["eos_token_id"] = tiny_cfg["bos_token_id"], tiny_cfg["eos_token_id"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "generation_config")):
            shutil.copyfile(f, out / f.name)
    return out


# ------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count
        )
        env["cuda"] = torch.version.cuda
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception:
            env["driver"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mathforge.engine import kernels
    from mathforge.engine.config import ModelConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    shape = load_shape(args.config, args.set)
    cfg = ModelConfig.from_dict(shape)
    if args.save:
        save_random_checkpoint(shape, Path(args.save), device=str(device))
        print(f"saved a random-weight checkpoint of this shape to {args.save}", flush=True)
        if args.save_only:
            return {}
    if args.draft_layers and args.verify_tokens < 2:
        raise UserError("--draft-layers needs --verify-tokens K1 with K1 >= 2 (the draft length + 1)")
    variants = args.variants
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if device.type == "cpu":
        # FP8 on CPU is an exact emulation (slow); the tiny CPU run is a functional check, not a measurement
        torch.set_num_threads(max(1, torch.get_num_threads()))
    res: dict[str, Any] = {
        "what": "torch-backend engine speed (mathforge bench-engine)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "mathforge bench-engine " + " ".join(shlex.quote(a) for a in args.argv),
        "note": NOTE,
        "environment": environment(device),
        "shape": shape,
        "context": args.context,
        "cuda_graphs": not args.no_graphs and device.type == "cuda",
        "kernels": {
            "fast_path": kernels.ENABLED and kernels.ops() is not None,
            "skinny_max_m": kernels.SKINNY_MAX_M,
            "gemv": kernels.GEMV,
        },
    }
    bw = copy_bandwidth(device, args.bandwidth_bytes)
    res["copy_bandwidth_GBps"] = round(bw / 1e9, 3)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    if args.gemv and device.type == "cuda":
        res["gemv"] = gemv_table(cfg, device)
    results: list[dict[str, Any]] = []
    for variant in variants:
        model = random_model(cfg, variant, device)
        for B in args.batch_sizes:
            ms, finite = bench_decode(
                model, cfg, B, args.context, graphs=not args.no_graphs, iters=args.iters
            )
            wbytes = weight_bytes_per_step(model, B)
            kbytes = kv_bytes_per_step(cfg, B, args.context)
            limit_ms = (wbytes + kbytes) / bw * 1000
            r = {
                "variant": variant,
                "batch": B,
                "step_ms": round(ms, 4),
                "tok_s": round(B * 1000 / ms, 1),
                "weight_bytes_per_step": wbytes,
                "kv_bytes_per_step": kbytes,
                "weight_GB_per_step": round(wbytes / 1e9, 3),
                "kv_GB_per_step": round(kbytes / 1e9, 3),
                "limit_ms": round(limit_ms, 6),
                "fraction_of_limit": round(limit_ms / ms, 5),
                "logits_finite": finite,
            }
            results.append(r)
            print(
                f"{variant:8s} B={B:<3d} step {ms:8.3f} ms  {r['tok_s']:9.1f} tok/s  "
                f"limit {limit_ms:7.3f} ms  {100 * r['fraction_of_limit']:5.1f}% of limit",
                flush=True,
            )
        for B in args.batch_sizes if args.verify_tokens else []:
            ms, finite = bench_decode(
                model,
                cfg,
                B,
                args.context,
                graphs=not args.no_graphs,
                iters=args.iters,
                tokens=args.verify_tokens,
            )
            results.append(
                {
                    "variant": variant,
                    "batch": B,
                    "verify_tokens": args.verify_tokens,
                    "verify_step_ms": round(ms, 4),
                    "logits_finite": finite,
                }
            )
            print(
                f"{variant:8s} B={B:<3d} verify of {args.verify_tokens} tokens/row: {ms:8.3f} ms", flush=True
            )
        for B in args.batch_sizes if args.verify_tokens and args.draft_layers else []:
            row = {"variant": variant, "batch": B, "draft_len": args.verify_tokens - 1}
            row["draft_layers"] = args.draft_layers
            for graphs in (False, True) if device.type == "cuda" and not args.no_graphs else (False,):
                ms = bench_draft(
                    model, cfg, B, args.verify_tokens - 1, args.draft_layers, graphs=graphs, iters=args.iters
                )
                row["draft_ms_graphs" if graphs else "draft_ms_eager"] = round(ms, 4)
            verify = next(
                r for r in results if r.get("verify_step_ms") and r["batch"] == B and r["variant"] == variant
            )
            step = next(r for r in results if "step_ms" in r and r["batch"] == B and r["variant"] == variant)
            spec_ms = verify["verify_step_ms"] + row.get("draft_ms_graphs", row["draft_ms_eager"])
            # tokens each draft + verify step must emit for speculative decoding to beat plain decode steps
            row["break_even_tokens_per_step"] = round(spec_ms / step["step_ms"], 3)
            results.append(row)
            print(
                f"{variant:8s} B={B:<3d} draft {row['draft_len']} tokens: eager {row['draft_ms_eager']:8.3f} ms"
                + (f", graphs {row['draft_ms_graphs']:8.3f} ms" if "draft_ms_graphs" in row else "")
                + f"; break-even {row['break_even_tokens_per_step']:.2f} tokens/step",
                flush=True,
            )
        if args.eager_b1:
            ms, _ = bench_decode(model, cfg, 1, args.context, graphs=False, iters=max(3, args.iters // 5))
            results.append({"variant": variant, "batch": 1, "eager_step_ms": round(ms, 4), "graphs": False})
            print(f"{variant:8s} B=1   eager (no graph) step {ms:8.3f} ms", flush=True)
        if args.prefill_tokens:
            ms = bench_prefill(model, cfg, args.prefill_tokens)
            flops = 2 * matmul_params(model) * args.prefill_tokens
            results.append(
                {
                    "variant": variant,
                    "prefill_tokens": args.prefill_tokens,
                    "prefill_ms": round(ms, 3),
                    "prefill_tok_s": round(args.prefill_tokens * 1000 / ms, 1),
                    "approx_TFLOPs": round(flops / (ms / 1000) / 1e12, 1),
                }
            )
            print(
                f"{variant:8s} prefill {args.prefill_tokens} tokens: {ms:8.2f} ms, {args.prefill_tokens * 1000 / ms:9.0f} tok/s",
                flush=True,
            )
        if args.profile and device.type == "cuda":
            res.setdefault("profiles", {})[variant] = [
                profile_step(model, cfg, B, args.context) for B in args.profile
            ]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["results"] = results
    bf16 = {r["batch"]: r["step_ms"] for r in results if r["variant"] == "bf16" and "step_ms" in r}
    for r in results:
        if "step_ms" in r and r["batch"] in bf16:
            r["speedup_vs_bf16"] = round(bf16[r["batch"]] / r["step_ms"], 3)
    if args.compare_compile and device.type == "cuda":
        res["compile_comparison"] = compare_compile(shape, args.compare_compile, args.context, device)
        print("compile comparison:", json.dumps(res["compile_comparison"]), flush=True)
    res["kernel_checks"] = kernels.status()
    res["gemv_choices"] = kernels.choices()
    return res


def print_table(res: dict[str, Any]) -> None:
    rows = [r for r in res.get("results", []) if "step_ms" in r]
    print(f"\n{res['note']}")
    print(f"copy bandwidth {res['copy_bandwidth_GBps']} GB/s; context {res['context']}")
    print(
        f"{'variant':8s} {'B':>3s} {'step ms':>9s} {'tok/s':>9s} {'GB/step':>8s} {'limit ms':>9s} {'% limit':>8s} {'vs bf16':>8s}"
    )
    for r in rows:
        print(
            f"{r['variant']:8s} {r['batch']:3d} {r['step_ms']:9.3f} {r['tok_s']:9.1f} "
            f"{r['weight_GB_per_step'] + r['kv_GB_per_step']:8.2f} {r['limit_ms']:9.3f} "
            f"{100 * r['fraction_of_limit']:7.1f}% {r.get('speedup_vs_bf16', float('nan')):8.2f}"
        )
    for r in res.get("results", []):
        if "prefill_tok_s" in r:
            print(f"{r['variant']:8s} prefill {r['prefill_tokens']} tok: {r['prefill_tok_s']:.0f} tok/s")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-engine",
        help="decode/prefill speed of the torch backend vs the bandwidth limit (random weights)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--config",
        default="openmath-14b",
        help=f"model shape: {', '.join([*SHAPES, 'tiny'])}, or an HF config.json / checkpoint dir (default openmath-14b)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument(
        "--variants",
        type=lambda s: [v for v in s.split(",") if v],
        default=list(VARIANTS),
        help="bf16,fp8,int8_wo",
    )
    p.add_argument(
        "--batch-sizes", type=positive_ints, default=[1, 8, 32], help="decode batch sizes (default 1,8,32)"
    )
    p.add_argument("--context", type=int, default=1024, help="tokens in each row's context (default 1024)")
    p.add_argument(
        "--prefill-tokens", type=int, default=1024, help="prefill length, 0 to skip (default 1024)"
    )
    p.add_argument("--iters", type=int, default=50, help="decode steps per timing sample (default 50)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument(
        "--no-graphs", action="store_true", help="time eager forwards instead of CUDA-graph replays"
    )
    p.add_argument("--eager-b1", action="store_true", help="also time batch 1 without CUDA graphs")
    p.add_argument(
        "--verify-tokens",
        type=int,
        default=0,
        metavar="K1",
        help="also time a speculative verify forward of K1 tokens per row (draft_len + 1) at each batch size",
    )
    p.add_argument(
        "--draft-layers",
        type=int,
        default=0,
        metavar="N",
        help="with --verify-tokens: also time a random ReDrafter drafter with N ResBlocks drafting K1 - 1 "
        "tokens (eager and from a CUDA graph) and report the tokens per step speculation must emit to break even",
    )
    p.add_argument("--gemv", action="store_true", help="GEMV table: cuBLAS / _scaled_mm / Triton at M=1..32")
    p.add_argument(
        "--profile",
        type=positive_ints,
        default=[],
        metavar="B,...",
        help="torch.profiler breakdown at these batch sizes",
    )
    p.add_argument(
        "--compare-compile",
        type=int,
        default=0,
        metavar="LAYERS",
        help="torch.compile comparison on LAYERS layers",
    )
    p.add_argument(
        "--bandwidth-bytes", type=int, default=4 << 30, help="copy-bandwidth buffer size (default 4 GiB)"
    )
    p.add_argument(
        "--save", default=None, metavar="DIR", help="write a random-weight HF checkpoint of the shape"
    )
    p.add_argument("--save-only", action="store_true", help="with --save: write the checkpoint and stop")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.set_defaults(func=cmd_bench_engine)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    if args.context < 2 or args.iters < 1 or args.prefill_tokens < 0:
        raise UserError("--context must be >= 2, --iters >= 1, --prefill-tokens >= 0")
    if args.save_only and not args.save:
        raise UserError("--save-only needs --save DIR")
    args.argv = sys.argv[sys.argv.index("bench-engine") + 1 :] if "bench-engine" in sys.argv else []
    res = run(args)
    if not res:
        return 0
    print_table(res)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"results: {args.out}")
    return 0
