"""The torch backend's decoder against transformers on the same random weights.

Tolerances (measured on these configs, logits of magnitude ~3-4):
  float32: max |ours - transformers| ~ 4e-6; asserted < 1e-4.
  bfloat16: max ~ 0.04 (2-3 bf16 ulps at |logit| in [2, 4]); asserted < 0.1, and our top-1 token is
  within that tolerance of transformers' top-1 logit (bf16 logits often tie, so exact argmax is not asserted).
Greedy decoding is compared in float32 (token-for-token equality with `generate`).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mathforge.engine.config import ModelConfig
from mathforge.engine.model import Transformer
from mathforge.errors import UserError

V = 256
SMALL = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def random_hf(kind: str, dtype=torch.float32, seed: int = 0, **over):
    """A small transformers model with every weight (norms and biases too) randomised, so nothing is trivial."""
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(**{**SMALL, "rope_theta": 10000.0, "tie_word_embeddings": True, **over})
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(**{**SMALL, "rope_scaling": LLAMA3_ROPE, "attention_bias": True, **over})
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def load_ours(hf, tmp_path, dtype, **save_kw) -> Transformer:
    hf.save_pretrained(tmp_path, **save_kw)
    m = Transformer.from_pretrained(tmp_path, dtype=dtype)
    m.setup_cache(max_slots=4, max_seq_len=128)
    return m


def decode_stepwise(m: Transformer, ids: torch.Tensor, slot: int, kv_len: int = 64) -> torch.Tensor:
    outs = [
        m(ids[:, t : t + 1], torch.tensor([[t]]), torch.tensor([slot]), kv_len) for t in range(ids.shape[1])
    ]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers(kind, dtype, tmp_path):
    hf = random_hf(kind, dtype)
    m = load_ours(hf, tmp_path, dtype)
    assert m.config.model_type == kind and m.dtype == dtype
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        prefill = m(ids, torch.arange(40)[None], torch.tensor([2]), 64)
        decode = decode_stepwise(m, ids, slot=1)
    assert prefill.dtype == torch.float32 and prefill.shape == (1, 40, V)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for out in (prefill, decode):
        assert (out - ref).abs().max().item() < tol
        if dtype == torch.float32:
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
        else:  # bf16 logits tie often; our top-1 must be a top-1 of transformers' up to the tolerance
            assert (
                ref.gather(-1, out.argmax(-1, keepdim=True)) >= ref.max(-1, keepdim=True).values - tol
            ).all()


def test_sharded_checkpoint_loads(tmp_path):
    hf = random_hf("qwen2", tie_word_embeddings=False)
    m = load_ours(hf, tmp_path, torch.float32, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        out = m(ids, torch.arange(16)[None], torch.tensor([0]), 64)
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_matches_generate_float32(kind, tmp_path):
    hf = random_hf(kind, seed=3)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    m = load_ours(hf, tmp_path, torch.float32)
    prompt = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(4))
    n_new = 24
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)[
            0, 12:
        ].tolist()
        logits = m(prompt, torch.arange(12)[None], torch.tensor([3]), 64)
        tok = int(logits[0, -1].argmax())
        ours = [tok]
        for pos in range(12, 12 + n_new - 1):
            logits = m(torch.tensor([[tok]]), torch.tensor([[pos]]), torch.tensor([3]), 64)
            tok = int(logits[0, -1].argmax())
            ours.append(tok)
    assert ours == ref


def test_slot_isolation_and_stale_cache(tmp_path):
    m = load_ours(random_hf("llama", seed=5), tmp_path, torch.float32)
    g = torch.Generator().manual_seed(6)
    a, b, junk = (torch.randint(0, V, (1, n), generator=g) for n in (20, 20, 60))
    pos = torch.arange(20)[None]
    with torch.no_grad():
        alone_a = m(a, pos, torch.tensor([0]), 64)
        alone_b = m(b, pos, torch.tensor([1]), 64)
        # fill slot 2 with a longer, unrelated sequence, then reuse it for `a` without zeroing
        m(junk, torch.arange(60)[None], torch.tensor([2]), 64)
        both = m(torch.cat([b, a]), pos.expand(2, -1), torch.tensor([1, 2]), 64)
        # continue both by one token (decode) and compare with continuing each alone
        nxt = torch.tensor([[7], [9]])
        step = m(nxt, torch.tensor([[20], [20]]), torch.tensor([1, 2]), 64)
        step_b = m(nxt[:1], torch.tensor([[20]]), torch.tensor([1]), 64)
        step_a = m(nxt[1:], torch.tensor([[20]]), torch.tensor([0]), 64)
    assert torch.allclose(both[0], alone_b[0], atol=1e-5) and torch.allclose(both[1], alone_a[0], atol=1e-5)
    assert torch.allclose(step[0], step_b[0], atol=1e-5) and torch.allclose(step[1], step_a[0], atol=1e-5)


def test_multi_token_steps_and_padding_rows(tmp_path):
    """Chunked prefill / k+1-token verification at non-zero positions equals one full prefill; padding rows
    (a scratch slot, position 0) run without error; kv_len buckets larger than needed change nothing."""
    m = load_ours(random_hf("qwen2", seed=7), tmp_path, torch.float32)
    ids = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = m(ids, torch.arange(30)[None], torch.tensor([0]), 32)
        m(ids[:, :25], torch.arange(25)[None], torch.tensor([1]), 32)
        pad_ids = torch.cat([ids[:, 25:], torch.zeros(1, 5, dtype=torch.long)])
        pad_pos = torch.stack([torch.arange(25, 30), torch.zeros(5, dtype=torch.long)])
        chunk, hidden = m(pad_ids, pad_pos, torch.tensor([1, 3]), 128, return_hidden=True)
        last = m(ids, torch.arange(30)[None], torch.tensor([0]), 32, logits_at=torch.tensor([[29, 3]]))
    assert torch.allclose(chunk[0], full[0, 25:], atol=1e-5)
    assert hidden.shape == (2, 5, 64) and torch.isfinite(chunk).all()
    assert torch.allclose(m.logits(hidden[:1]), chunk[:1])
    assert last.shape == (1, 2, V) and torch.allclose(last[0], full[0, [29, 3]])


def test_config_parsing(tmp_path):
    base = {
        **SMALL,
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}},
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
    }
    c = ModelConfig.from_dict(base)  # transformers<5 layout
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3"
    assert c.head_dim == 16 and not c.qkv_bias and c.eos_token_id == [2, 3] and c.bos_token_id == 1
    q = ModelConfig.from_dict(
        {**SMALL, "model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    )
    assert q.rope_theta == 1e6 and q.rope_scaling is None and q.qkv_bias and q.eos_token_id == []
    assert (
        ModelConfig.from_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling[
            "factor"
        ]
        == 2.0
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model_type 'gpt2'"),
        (
            {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "unsupported RoPE scaling 'yarn'",
        ),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "sliding"),
    ],
)
def test_unsupported_configs_raise_user_error(bad, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, **bad}))
    with pytest.raises(UserError, match=match):
        Transformer.from_pretrained(tmp_path)


def test_missing_weights_is_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "qwen2"}))
    with pytest.raises(UserError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)
