"""FP8 (e4m3, per-tensor static scales): the CPU emulation, quantisation helpers, and calibrate_fp8's output.

Measured on the shipped tiny model (the trained 6.8M Qwen2, logits std ~2.3) with the calibration texts
below, FP8 vs BF16-checkpoint logits, float32 activations: cosine similarity mean 0.9996 / min 0.995, top-1
agreement 0.95 (the random-weight model it replaced gave 0.997 / 0.995 / 0.87). Asserted: mean > 0.99,
min > 0.98, top-1 >= 0.75.
(On an H200 the _scaled_mm path differs from this exact emulation only by the FP8 tensor cores'
accumulation, ~2e-4 relative per GEMM, measured.)
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from mathforge.engine.fp8 import FP8_MAX, FP8Linear, amax_to_scale, dequantize_tensor, quantize_tensor
from mathforge.engine.model import Transformer
from mathforge.errors import UserError
from mathforge.quantize import calibrate_fp8


def test_amax_to_scale_and_round_trip():
    assert amax_to_scale(448.0).item() == 1.0 and amax_to_scale(0.0).item() > 0
    t = torch.randn(1000) * 3
    s = amax_to_scale(t.abs().max())
    q = quantize_tensor(t, s)
    assert q.dtype == torch.float8_e4m3fn and q.float().abs().max().item() == FP8_MAX
    back = dequantize_tensor(q, s)
    # e4m3 has 3 mantissa bits: round-to-nearest error <= 2^-4 relative (normal range)
    normal = t.abs() > s * 2**-6
    assert ((back - t).abs()[normal] <= t.abs()[normal] * 2**-4 + 1e-7).all()
    assert torch.equal(quantize_tensor(back, s).view(torch.uint8), q.view(torch.uint8))  # idempotent
    # saturation instead of NaN beyond the range
    assert quantize_tensor(torch.tensor([1e6, -1e6]), 1.0).float().tolist() == [448.0, -448.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8linear_cpu_emulation_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.1
    b = torch.randn(48, generator=g).to(dtype)
    x = (torch.randn(2, 5, 64, generator=g) * 2).to(dtype)
    in_scale = torch.tensor(x.float().abs().max().item() / 448 * 0.5)  # half the range: some inputs saturate
    lin = FP8Linear.from_float(w, b, input_scale=in_scale)
    assert (
        lin.weight.dtype == torch.float8_e4m3fn
        and lin.weight_scale.shape == ()
        and lin.input_scale.shape == ()
    )
    # reference: x_q = cast_e4m3(clamp(x / s_in, ±448)); y = (x_q·s_in) @ (w_q·s_w)^T + b, in float64
    xq = torch.clamp(x.double() / in_scale.double(), -448, 448).float().to(torch.float8_e4m3fn).double()
    wq = lin.weight.double()
    ref = (xq * in_scale.double()) @ (wq * lin.weight_scale.double()).t() + b.double()
    out = lin(x)
    assert out.dtype == dtype and out.shape == (2, 5, 48)
    tol = 1e-5 if dtype == torch.float32 else 0.02  # fp32: summation order only; bf16: one output rounding
    assert (out.double() - ref).abs().max().item() < tol * ref.abs().max().item()


TEXT_TEMPLATE = "Solve {a}*{b} + {c} = ? Put the answer in \\boxed{{}}."


@pytest.fixture(scope="module")
def fp8_tiny(tiny_model_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = [
        tok.apply_chat_template(
            [
                {"role": "user", "content": TEXT_TEMPLATE.format(a=i, b=i + 3, c=7 * i)},
                {
                    "role": "assistant",
                    "content": f"We compute {i}*{i + 3} = {i * (i + 3)}, so \\boxed{{{i * (i + 3) + 7 * i}}}.",
                },
            ],
            tokenize=False,
        )
        for i in range(16)
    ]
    d = tmp_path_factory.mktemp("fp8")
    pq.write_table(pa.table({"text": texts}), d / "calib.parquet")
    calls = []
    summary = calibrate_fp8(
        tiny_model_dir,
        d / "calib.parquet",
        d / "out",
        max_seq_len=256,
        progress=lambda i, n: calls.append((i, n)),
    )
    return {"dir": d / "out", "summary": summary, "texts": texts, "tok": tok, "calls": calls, "work": d}


def test_calibrate_writes_modelopt_layout(fp8_tiny, tiny_model_dir):
    out, s = fp8_tiny["dir"], fp8_tiny["summary"]
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert s["layers_quantized"] == 7 * layers and s["num_samples"] == 16
    assert fp8_tiny["calls"][-1] == (16, 16)
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert hq["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
    }
    assert set(hq["producer"]) == {"name", "version"}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8" and "lm_head" in qc["ignore"]
    assert qc["config_groups"]["group_0"]["weights"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tiny_model_dir / f).read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    for proj in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ):
        n = f"model.layers.0.{proj}"
        assert t[f"{n}.weight"].dtype == torch.float8_e4m3fn
        for sc in ("weight_scale", "input_scale"):
            assert t[f"{n}.{sc}"].dtype == torch.float32 and t[f"{n}.{sc}"].shape == () and t[f"{n}.{sc}"] > 0
    # fused groups share their scales (as ModelOpt's export does)
    assert (
        t["model.layers.0.self_attn.q_proj.input_scale"] == t["model.layers.0.self_attn.v_proj.input_scale"]
    )
    assert t["model.layers.0.mlp.gate_proj.weight_scale"] == t["model.layers.0.mlp.up_proj.weight_scale"]
    for k in (
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ):
        assert t[k].dtype == torch.bfloat16
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in t)


def test_calibrate_is_deterministic(fp8_tiny, tiny_model_dir):
    again = fp8_tiny["work"] / "again"
    calibrate_fp8(tiny_model_dir, fp8_tiny["work"] / "calib.parquet", again, max_seq_len=256)
    for f in sorted(p.name for p in fp8_tiny["dir"].iterdir()):
        assert (again / f).read_bytes() == (fp8_tiny["dir"] / f).read_bytes(), f


def test_fp8_logits_close_to_bf16(fp8_tiny, tiny_model_dir):
    base = Transformer.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fp8 = Transformer.from_pretrained(fp8_tiny["dir"], dtype=torch.float32)
    assert fp8.fp8 and isinstance(fp8.layers[0].self_attn.qkv_proj, FP8Linear)
    assert isinstance(fp8.lm_head, torch.nn.Linear) and fp8.lm_head.weight.dtype == torch.float32
    cos, agree = [], []
    for m in (base, fp8):
        m.setup_cache(1, 256)
    for text in fp8_tiny["texts"]:
        ids = torch.tensor([fp8_tiny["tok"](text, add_special_tokens=False)["input_ids"]])
        args = (ids, torch.arange(ids.shape[1])[None], torch.tensor([0]), ids.shape[1])
        lb, lf = base(*args)[0], fp8(*args)[0]
        cos.append(torch.nn.functional.cosine_similarity(lb, lf, dim=-1))
        agree.append((lb.argmax(-1) == lf.argmax(-1)).float())
    cos, agree = torch.cat(cos), torch.cat(agree)
    assert cos.mean() > 0.99 and cos.min() > 0.98 and agree.mean() >= 0.75, (
        cos.mean(),
        cos.min(),
        agree.mean(),
    )


def test_calibrate_rejects_bad_inputs(fp8_tiny, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="already an FP8"):
        calibrate_fp8(fp8_tiny["dir"], fp8_tiny["work"] / "calib.parquet", tmp_path / "x")
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="text"):
        calibrate_fp8(tiny_model_dir, tmp_path / "bad.parquet", tmp_path / "y")


def test_fused_shards_with_different_scales_are_requantised(tmp_path):
    """A foreign checkpoint whose q/k/v carry different weight scales still loads (requantised to the max)."""
    from mathforge.engine.config import ModelConfig
    from mathforge.engine.model import _convert_state_dict

    cfg = ModelConfig.from_dict(
        dict(
            model_type="llama",
            vocab_size=8,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    g = torch.Generator().manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(8, 16),
        "model.norm.weight": torch.ones(16),
        "lm_head.weight": torch.randn(8, 16),
    }
    for n in ("input_layernorm", "post_attention_layernorm"):
        t[f"model.layers.0.{n}.weight"] = torch.ones(16)
    for i, (n, o) in enumerate(
        [
            ("self_attn.q_proj", 16),
            ("self_attn.k_proj", 8),
            ("self_attn.v_proj", 8),
            ("self_attn.o_proj", 16),
            ("mlp.gate_proj", 16),
            ("mlp.up_proj", 16),
            ("mlp.down_proj", 16),
        ]
    ):
        w = torch.randn(o, 16, generator=g) * (i + 1)
        s = amax_to_scale(w.abs().max())
        t[f"model.layers.0.{n}.weight"] = quantize_tensor(w, s)
        t[f"model.layers.0.{n}.weight_scale"] = s
        t[f"model.layers.0.{n}.input_scale"] = torch.tensor(0.01 * (i + 1))
    sd = _convert_state_dict(cfg, dict(t), True, torch.bfloat16)
    qkv = dequantize_tensor(
        sd["layers.0.self_attn.qkv_proj.weight"], sd["layers.0.self_attn.qkv_proj.weight_scale"]
    )
    orig = torch.cat(
        [
            dequantize_tensor(
                t[f"model.layers.0.self_attn.{p}_proj.weight"],
                t[f"model.layers.0.self_attn.{p}_proj.weight_scale"],
            )
            for p in "qkv"
        ]
    )
    assert sd["layers.0.self_attn.qkv_proj.input_scale"].item() == pytest.approx(0.03)
    assert (qkv - orig).abs().max() <= orig.abs().max() * 2**-4


def test_fp8_detected_from_config_json_alone(fp8_tiny, tmp_path):
    """Checkpoints that carry only config.json's quantization_config (no hf_quant_config.json) load as FP8."""
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(fp8_tiny["dir"], d)
    (d / "hf_quant_config.json").unlink()
    m = Transformer.from_pretrained(d, dtype=torch.float32)
    assert m.fp8 and isinstance(m.layers[0].mlp.down_proj, FP8Linear)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="bitsandbytes"):
        Transformer.from_pretrained(d)
