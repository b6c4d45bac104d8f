"""The CUDA-graph runner and the fused decode kernels, on CPU.

No GPU here, so the runner is exercised with its "eager-replay" backend: a captured "graph" re-runs the
forward on the runner's static input buffers and copies into the captured output tensors, so anything
wrong in the buffer plumbing (an input not copied, a key that mixes shapes, outputs not refreshed) changes
the result, exactly as it would with torch.cuda.CUDAGraph. The Triton kernels run through Triton's
interpreter when triton is importable (skipped otherwise); on the H200 the same kernels are checked
against the eager code on first use (mathforge.engine.kernels.verified).

Tolerances: float32 runner vs plain model: bitwise equal (same ops). Fast path vs eager in bf16 (2-layer
random model): logits relative L2 error < 0.05 (measured ~0.02: bf16 rounding in a different order),
argmax agreement >= 90% of all rows compared.
"""

from __future__ import annotations

import os

import pytest
import torch

from mathforge.engine import kernels
from mathforge.engine.api import SamplingParams
from mathforge.engine.config import ModelConfig
from mathforge.engine.engine import Engine, decode_buckets
from mathforge.engine.graphs import CUDAGraphRunner, GraphedFunction
from mathforge.engine.model import Transformer

CFG = dict(
    model_type="qwen2",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def random_model(dtype=torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_dict(CFG))
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
    return m.to(dtype).eval().requires_grad_(False)


def test_runner_replays_with_fresh_inputs_and_falls_back_for_prefill():
    m = random_model()
    m.setup_cache(5, 128)
    ref = random_model()  # same weights, separate cache: the plain eager model
    ref.setup_cache(5, 128)
    runner = CUDAGraphRunner(m, batch_sizes=[1, 2, 4], token_counts=(1, 3), backend="eager-replay")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128, (2, 10), generator=g)
    pos = torch.arange(10)[None].expand(2, -1)
    slots = torch.tensor([0, 3])
    with torch.inference_mode():
        a = runner(prompt, pos, slots, 128, logits_at=torch.tensor([[9], [9]]))  # prefill: eager
        b = ref(prompt, pos, slots, 128, logits_at=torch.tensor([[9], [9]]))
        assert torch.equal(a, b) and runner.eager_calls == 1 and not runner.graphs
        for step in range(4):  # decode T=1: first call eager + capture, then replays on new inputs
            ids = torch.randint(0, 128, (2, 1), generator=g)
            p = torch.full((2, 1), 10 + step)
            out = runner(ids, p, slots, 128)
            expect = ref(ids, p, slots, 128)
            assert torch.equal(out, expect), step
        assert runner.replays == 3 and len(runner.graphs) == 1
        # a verify-shaped call (T=3, hidden states back) gets its own graph and the right answers
        for step in range(2):
            ids = torch.randint(0, 128, (2, 3), generator=g)
            p = torch.arange(14 + 3 * step, 17 + 3 * step)[None].expand(2, -1)
            lo, hid = runner(ids, p, slots, 128, True)
            lo_ref, hid_ref = ref(ids, p, slots, 128, True)
            assert torch.equal(lo, lo_ref) and torch.equal(hid, hid_ref)
        # not asked for: B=3 (not a bucket), T=2 -> eager
        before = runner.eager_calls
        runner(
            torch.zeros((3, 1), dtype=torch.long),
            torch.zeros((3, 1), dtype=torch.long),
            torch.tensor([0, 1, 2]),
            128,
        )
        runner(torch.zeros((1, 2), dtype=torch.long), torch.tensor([[0, 1]]), torch.tensor([4]), 128)
        assert runner.eager_calls == before + 2
    # the eager model's forward shapes depend on kv_len: one graph per kv_len bucket
    assert m.uses_kv_len(1) and {k[2] for k in runner.graphs} == {128}
    assert runner.stats()["graphs"] == len(runner.graphs) == 2


def test_runner_graph_outputs_are_static_buffers():
    """Replays write into the captured output tensors (the engine consumes them before the next call)."""
    m = random_model()
    m.setup_cache(3, 64)
    runner = CUDAGraphRunner(m, batch_sizes=[1], backend="eager-replay")
    with torch.inference_mode():
        runner(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([0]), 64)
        first = runner(torch.tensor([[2]]), torch.tensor([[1]]), torch.tensor([0]), 64)
        kept = first.clone()
        second = runner(torch.tensor([[3]]), torch.tensor([[2]]), torch.tensor([0]), 64)
    assert second.data_ptr() == first.data_ptr() and not torch.equal(kept, second)


def test_warmup_captures_buckets_ahead_only_when_kv_free():
    m = random_model()
    m.setup_cache(5, 128)
    runner = CUDAGraphRunner(m, batch_sizes=[1, 2, 4], backend="eager-replay")
    assert runner.warmup() == 0  # the eager path depends on kv_len: nothing to capture ahead
    with pytest.raises(ValueError, match="CUDA device"):
        CUDAGraphRunner(m, batch_sizes=[1], backend="cuda")
    assert CUDAGraphRunner(m, batch_sizes=[1]).backend == "none"


def test_graphed_function_replays_per_shape_into_static_outputs():
    w = torch.randn(8, 8)
    calls = []

    def fn(x, t):
        calls.append(x.shape)
        return (x @ w).argmax(-1) + t

    g = GraphedFunction(fn, backend="eager-replay")
    x1, x2, t = torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0, 100])
    assert torch.equal(g(x1, t), fn(x1, t))  # first call: eager, then captured
    out = g(x2, t)
    assert torch.equal(out, (x2 @ w).argmax(-1) + t) and g.replays == 1
    assert g(x1, t) is out and torch.equal(out, (x1 @ w).argmax(-1) + t)  # the static output, refreshed
    g(torch.randn(3, 8), torch.zeros(3, dtype=torch.long))  # a new shape: its own graph
    assert len(g.graphs) == 2 and g.eager_calls == 2
    never = GraphedFunction(fn, backend="none")
    never(x1, t), never(x2, t)
    assert not never.graphs and never.eager_calls == 2
    with pytest.raises(ValueError, match="backend"):
        GraphedFunction(fn, backend="gpu")


def test_engine_with_graph_runner_generates_the_same_tokens(tiny_model_dir):
    plain = Engine.from_pretrained(tiny_model_dir, max_slots=4, max_model_len=256, dtype="float32")
    graphed = Engine.from_pretrained(
        tiny_model_dir, max_slots=4, max_model_len=256, dtype="float32", cuda_graphs=False
    )
    runner = CUDAGraphRunner(graphed.model, batch_sizes=decode_buckets(4), backend="eager-replay")
    graphed._runner = runner
    prompts = [plain.tokenizer.encode(p) for p in ("What is 2+3?", "Solve 3n + 7 = 22.", "x")]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a = plain.generate(prompts, params)
    b = graphed.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert runner.replays > 0 and runner.graphs
    with pytest.raises(Exception, match="CUDA graphs need device cuda"):
        Engine.from_pretrained(tiny_model_dir, max_slots=2, dtype="float32", cuda_graphs=True)


# ------------------------------------------------------------------------------ fused kernels (interpreter)
@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("run with TRITON_INTERPRET=1 to check the Triton kernels on CPU")
    if not _interpreter_works():
        pytest.skip("this Triton's interpreter cannot run loops with runtime bounds (numpy 2 + triton 3.6)")
    monkeypatch.setattr(kernels, "ALLOW_INTERPRETER", True)
    kernels.reset()
    yield
    kernels.reset()


def _interpreter_works() -> bool:
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for k in range(0, n, BLOCK):
            acc += tl.load(x + k + tl.arange(0, BLOCK))
        tl.store(x + tl.arange(0, BLOCK), acc)

    try:
        probe[(1,)](torch.ones(32), 32, BLOCK=16)
        return True
    except Exception:
        return False


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _int8(m: Transformer) -> Transformer:
    from mathforge.engine.int8 import Int8Linear

    for layer in m.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj")) + (
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ):
            lin = getattr(parent, name)
            setattr(parent, name, Int8Linear.from_float(lin.weight.float(), lin.bias))
    return m


@pytest.mark.parametrize("quant", [None, "int8_wo"])
def test_fast_path_matches_eager_and_is_kv_len_free(interpreter, quant):
    m = random_model(torch.bfloat16, seed=3)
    if quant:
        m = _int8(m)  # its prefill (2 x 40 = 80 rows > 64) takes the row-tiled Triton GEMM
    m.setup_cache(4, 128)
    g = torch.Generator().manual_seed(4)
    T0 = 40 if quant else 12
    ids = torch.randint(0, 128, (2, T0), generator=g)
    pos = torch.arange(T0)[None].expand(2, -1)
    slots = torch.tensor([0, 2])
    outs = {}
    with torch.inference_mode():
        for fast in (False, True):
            m.fast_kernels = fast
            steps = [m(ids, pos, slots, 64)]  # prefill
            for t in range(2):
                nid = torch.randint(0, 128, (2, 1), generator=torch.Generator().manual_seed(t))
                steps.append(m(nid, torch.full((2, 1), T0 + t), slots, 64))
            verify = torch.randint(0, 128, (3, 3), generator=torch.Generator().manual_seed(7))
            vpos = torch.tensor([[T0 + 2, T0 + 3, T0 + 4]] * 2 + [[0, 0, 0]])  # third row: padding, slot 3
            lo, hid = m(verify, vpos, torch.tensor([0, 2, 3]), 64, True)
            steps.append(lo[:2])
            outs[fast] = steps
    agree = []
    for eager, fast in zip(outs[False], outs[True], strict=True):
        assert _rel(fast, eager) < 0.05
        agree.append((fast.argmax(-1) == eager.argmax(-1)).flatten())
    assert torch.cat(agree).float().mean() >= 0.9  # bf16 logits tie now and then
    assert all(kernels.status().values()) and any(k.startswith("attention") for k in kernels.status())
    if quant:  # every int8 matmul ran in Triton, the 80-row prefill too
        assert {c["choice"] for c in kernels.choices().values()} == {"triton"}
        assert any(k.startswith("int8/128/") for k in kernels.choices())
    assert not m.uses_kv_len(1) and not m.uses_kv_len(3)  # fast decode attention reads positions


def test_kernel_that_disagrees_is_switched_off(interpreter, monkeypatch, caplog):
    """A wrong Triton result is caught on first use: the eager result is returned and the kernel disabled."""
    x = torch.randn(4, 32).to(torch.bfloat16)
    norm = torch.nn.Module()
    norm.weight, norm.eps = torch.ones(32, dtype=torch.bfloat16), 1e-6
    ops = kernels.ops()
    monkeypatch.setattr(ops, "add_rmsnorm", lambda x, d, w, eps, q: (x, x * 0))
    _, h = kernels.add_rmsnorm(x, None, norm)
    assert torch.allclose(h.float(), kernels.rmsnorm_ref(x, norm.weight, 1e-6).float())
    assert kernels.status() == {"add_rmsnorm/32/False/False": False} and "disagrees" in caplog.text
