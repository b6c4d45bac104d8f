"""`mathforge bench-engine` on CPU with a tiny shape: the command runs end to end for every variant and its
JSON carries what the GPU runs need (versions, the command, bytes per step, the limit and its fraction);
`--save` writes a checkpoint the engine serves. CPU timings are a functional check, not a measurement."""

from __future__ import annotations

import json

import pytest
import torch

from mathforge.bench import engine_speed as es
from mathforge.cli import main
from mathforge.engine.config import ModelConfig
from mathforge.errors import UserError

SMALL = [
    "--set",
    "hidden_size=64",
    "--set",
    "intermediate_size=128",
    "--set",
    "num_hidden_layers=2",
    "--set",
    "num_attention_heads=4",
    "--set",
    "num_key_value_heads=2",
    "--set",
    "vocab_size=2048",
]


def test_bench_engine_cpu_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench-engine", "--config", "openmath-14b", *SMALL, "--batch-sizes", "1,2", "--context", "24"]
    args += ["--prefill-tokens", "8", "--iters", "1", "--bandwidth-bytes", "4000000", "--out", str(out)]
    args += ["--verify-tokens", "3", "--draft-layers", "1"]
    assert main(args) == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "random weights" in res["note"] and "random weights" in printed and "% limit" in printed
    assert res["environment"]["torch"] == torch.__version__ and res["environment"]["device"] == "cpu"
    assert res["command"].startswith("mathforge bench-engine") and res["shape"]["num_hidden_layers"] == 2
    rows = [r for r in res["results"] if "step_ms" in r]
    assert {(r["variant"], r["batch"]) for r in rows} == {(v, b) for v in es.VARIANTS for b in (1, 2)}
    bw = res["copy_bandwidth_GBps"] * 1e9
    cfg = ModelConfig.from_dict(res["shape"])
    for r in rows:
        assert (
            r["logits_finite"]
            and r["step_ms"] > 0
            and r["tok_s"] == pytest.approx(r["batch"] * 1000 / r["step_ms"], rel=1e-2)
        )
        total = r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
        assert r["limit_ms"] == pytest.approx(total / bw * 1000, rel=1e-2)
        assert r["fraction_of_limit"] == pytest.approx(r["limit_ms"] / r["step_ms"], rel=1e-2)
        assert r["kv_bytes_per_step"] == es.kv_bytes_per_step(cfg, r["batch"], 24)
    # quantised variants read one byte instead of two per decoder Linear weight, plus their scales (fp8: two
    # fp32 scalars per Linear; int8: one fp32 per output row); lm_head, norms, biases stay bf16
    b1 = {r["variant"]: r["weight_bytes_per_step"] for r in rows if r["batch"] == 1}
    L, H, inter, D = 2, 64, 128, 16
    n_out = (4 + 2 * 2) * D + H + 2 * inter + H  # output rows of qkv, o, gate_up, down
    linear_params = L * (H * (8 * D) + H * H + H * 2 * inter + inter * H)
    assert b1["bf16"] - b1["fp8"] == linear_params - L * 4 * 2 * 4
    assert b1["bf16"] - b1["int8_wo"] == linear_params - L * n_out * 4
    assert {r["variant"] for r in res["results"] if "prefill_tok_s" in r} == set(es.VARIANTS)
    verify = [r for r in res["results"] if "verify_step_ms" in r]
    assert len(verify) == 6 and all(r["logits_finite"] and r["verify_tokens"] == 3 for r in verify)
    drafts = [r for r in res["results"] if "draft_ms_eager" in r]
    assert {(r["variant"], r["batch"]) for r in drafts} == {(v, b) for v in es.VARIANTS for b in (1, 2)}
    for d in drafts:  # (verify + draft) / plain step, of the same variant and batch
        (v,) = [r for r in verify if (r["variant"], r["batch"]) == (d["variant"], d["batch"])]
        (p,) = [r for r in rows if (r["variant"], r["batch"]) == (d["variant"], d["batch"])]
        assert d["draft_len"] == 2 and d["draft_layers"] == 1 and d["draft_ms_eager"] > 0
        expected = (v["verify_step_ms"] + d["draft_ms_eager"]) / p["step_ms"]
        assert d["break_even_tokens_per_step"] == pytest.approx(expected, rel=1e-2)


def test_weight_bytes_match_the_parameter_count():
    cfg = ModelConfig.from_dict(es.load_shape("openmath-14b", [s for s in SMALL if s != "--set"]))
    m = es.random_model(cfg, "bf16", "cpu")
    H, V = cfg.hidden_size, cfg.vocab_size
    linear = sum(p.numel() for n, p in m.named_parameters() if n.startswith("layers.") and "norm" not in n)
    norms = (2 * cfg.num_hidden_layers + 1) * H
    assert es.weight_bytes_per_step(m, 3) == 2 * (
        linear + norms + V * H + 3 * H
    )  # lm_head + 3 embedding rows
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    q = es.random_model(cfg, "int8_wo", "cpu")
    assert q.layers[0].mlp.down_proj.weight.dtype == torch.int8


def test_save_writes_a_servable_checkpoint(tmp_path):
    from mathforge.engine.api import SamplingParams
    from mathforge.engine.engine import Engine

    d = tmp_path / "ckpt"
    assert main(["bench-engine", "--config", "openmath-1.5b", *SMALL, "--save", str(d), "--save-only"]) == 0
    e = Engine.from_pretrained(d, max_slots=2, max_model_len=64, dtype="float32")
    assert e.model.config.tie_word_embeddings and e.model.config.hidden_size == 64
    # rows past the tokenizer's vocabulary are zero: generated ids are real tokens, so the text is not empty
    assert e.model.lm_head.weight[len(e.tokenizer) :].abs().max() == 0
    (out,) = e.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 6 and max(out.token_ids) < len(e.tokenizer) and out.text


def test_bad_shape_arguments():
    with pytest.raises(UserError, match="neither a shape"):
        es.load_shape("no-such-shape")
    with pytest.raises(UserError, match="KEY=VALUE"):
        es.load_shape("openmath-14b", ["hidden_size"])
    with pytest.raises(UserError, match="unsupported model_type"):
        es.load_shape("openmath-14b", ["model_type=gpt2"])
    assert (
        main(["bench-engine", "--variants", "bf17", "--device", "cpu", "--bandwidth-bytes", "1000000"]) == 2
    )
    assert main(["bench-engine", "--draft-layers", "2", "--device", "cpu"]) == 2  # needs --verify-tokens
