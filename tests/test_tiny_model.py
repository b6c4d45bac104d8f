"""The shipped, trained tiny model: a standard HF checkpoint that transformers loads and that decodes greedily
exactly as our engine does, small enough to ship, and really trained (it writes the reference tool call)."""

from __future__ import annotations

import json

import pytest
import torch

from mathforge.data import make_tiny
from mathforge.data.problems import load_problems
from mathforge.data.prompts import render_chat
from mathforge.engine.api import SamplingParams
from mathforge.engine.engine import Engine

MAX_NEW = 160


@pytest.fixture(scope="module")
def problems():
    return load_problems("tiny", split="test")[:3]


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir, problems):
    """transformers' own loading and greedy `generate` (float32), up to the first `</tool_call>`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    assert model.dtype == torch.float32 and tok.eos_token == "<|im_end|>"
    out = []
    for p in problems:
        prompt = render_chat(tok, p.problem, tools=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                stop_strings=["</tool_call>"],
                tokenizer=tok,
                eos_token_id=tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]),
            )
        out.append((prompt, tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)))
    return out


def test_checkpoint_is_small_standard_and_documented(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    for key, value in make_tiny.MODEL_SHAPE.items():
        assert cfg[key] == value
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    assert size <= 25_000_000
    card = (tiny_model_dir / "README.md").read_text()
    for needle in ("python -m mathforge.train", "H200", "loss", "mathforge evaluate"):
        assert needle in card


def test_transformers_greedy_text_equals_our_engine(tiny_model_dir, hf_greedy):
    engine = Engine.from_pretrained(tiny_model_dir, max_slots=4, max_model_len=1024, dtype="float32")
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, stop=["</tool_call>"])
    ours = engine.generate([engine.tokenizer.encode(prompt) for prompt, _ in hf_greedy], params)
    for (_, text), out in zip(hf_greedy, ours, strict=True):
        # our server does not echo the stop string (OpenAI semantics); transformers keeps it
        assert text.endswith("</tool_call>") and out.finish_reason == "stop"
        assert text.removesuffix("</tool_call>") == out.text


def test_it_writes_the_reference_tool_call(hf_greedy, problems):
    """Trained, not random: greedy decoding reproduces the held-out reference solution up to the tool call."""
    for (_, text), p in zip(hf_greedy, problems, strict=True):
        assert text == p.reference_solution.split("</tool_call>")[0] + "</tool_call>", p.id
