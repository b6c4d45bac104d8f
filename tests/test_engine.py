"""The continuous-batching engine (in process, no server): exactness against transformers, batching,
sampling semantics, stop handling, incremental detokenization, input validation, aborts."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from mathforge.engine.api import EngineInputError, SamplingParams
from mathforge.engine.async_engine import AsyncEngine
from mathforge.engine.detok import IncrementalDetokenizer
from mathforge.engine.engine import Engine, decode_buckets
from mathforge.engine.sampling import SamplingBatch, filter_logits, sample

PROMPTS = [
    "What is 2+3?",
    "Compute the sum of the first 10 primes.",
    "x",
    "Let f(x) = x^2 + 1. Find f(3), then put the answer in \\boxed{}.",
    "Solve for n: 3n + 7 = 22.",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, max_slots=4, max_model_len=512, dtype="float32")


@pytest.fixture(scope="module")
def prompt_ids(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir, prompt_ids) -> list[list[int]]:
    """transformers' greedy `generate` on the same checkpoint, float32 (tokens after the prompt)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
            out.append(gen[0, len(ids) :].tolist())
    return out


def test_greedy_matches_transformers_generate(engine, prompt_ids, hf_greedy):
    for ids, ref in zip(prompt_ids, hf_greedy, strict=True):
        (out,) = engine.generate([ids], GREEDY)
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if ref[-1] in engine.eos_token_ids else "length")
        text_ids = ref[:-1] if out.finish_reason == "stop" else ref
        assert out.text == engine.tokenizer.decode(text_ids, skip_special_tokens=True)
        assert (out.prompt_tokens, out.completion_tokens) == (len(ids), len(ref))


def test_concurrent_requests_are_batched_and_exact(engine, prompt_ids, hf_greedy):
    """5 prompts on 4 slots: batched decode, a queued request reusing a freed slot; each equals its solo run."""
    peak_before = engine.running_peak
    engine.running_peak = 0
    outs = engine.generate(prompt_ids, GREEDY)
    assert engine.running_peak == 4
    engine.running_peak = max(peak_before, 4)
    assert [o.token_ids for o in outs] == hf_greedy
    assert engine.stats()["free_slots"] == 4 and not engine.has_work()


def test_chunked_prefill_matches(tiny_model_dir, prompt_ids, hf_greedy):
    eng = Engine.from_pretrained(
        tiny_model_dir,
        max_slots=2,
        max_model_len=256,
        dtype="float32",
        prefill_chunk=4,
        max_prefill_tokens=8,
        kv_block=16,
    )
    outs = eng.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == hf_greedy


def test_ignore_eos_and_stop_token_ids(engine, prompt_ids, hf_greedy):
    i = next(k for k, ref in enumerate(hf_greedy) if ref[-1] in engine.eos_token_ids)
    (out,) = engine.generate(
        [prompt_ids[i]], SamplingParams(max_tokens=len(hf_greedy[i]) + 3, temperature=0, ignore_eos=True)
    )
    assert out.finish_reason == "length" and out.token_ids[: len(hf_greedy[i])] == hf_greedy[i]
    ref = hf_greedy[0]
    (out,) = engine.generate(
        [prompt_ids[0]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[ref[3]])
    )
    cut = ref.index(ref[3]) + 1
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
    assert out.text == engine.tokenizer.decode(ref[: cut - 1], skip_special_tokens=True)


def test_stop_strings(engine, prompt_ids):
    base = engine.generate([prompt_ids[1]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = base.text
    assert len(text) > 12
    stop = text[7:11]
    first = text.find(stop)
    (out,) = engine.generate(
        [prompt_ids[1]],
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["never-there", stop]),
    )
    assert out.finish_reason == "stop"
    assert out.text == text[:first]
    assert out.token_ids == base.token_ids[: len(out.token_ids)]


def test_seeded_sampling_is_reproducible(engine, prompt_ids):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    solo = engine.generate([prompt_ids[0]], p)[0].token_ids
    # same seed inside a batch with other (differently seeded / greedy) requests
    mixed = engine.generate(
        [prompt_ids[0], prompt_ids[1], prompt_ids[2]],
        [p, SamplingParams(max_tokens=16, temperature=1.0, seed=5), GREEDY],
    )
    assert mixed[0].token_ids == solo
    assert engine.generate([prompt_ids[0]], p)[0].token_ids == solo
    other = engine.generate(
        [prompt_ids[0]], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=4321)
    )[0].token_ids
    assert other != solo


def test_sampling_filters_match_transformers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    V = 97
    logits = torch.randn(4, V) * 3
    cases = [
        SamplingParams(temperature=0.7, top_k=10),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05),
    ]
    sb = SamplingBatch.build(cases, V, torch.device("cpu"))
    ours = filter_logits(logits, sb)
    for i, p in enumerate(cases):
        x = logits[i : i + 1].clone()
        ids = torch.zeros(1, 1, dtype=torch.long)
        x = TemperatureLogitsWarper(p.temperature)(ids, x)
        if p.top_k > 0:
            x = TopKLogitsWarper(p.top_k)(ids, x)
        if p.top_p < 1:
            x = TopPLogitsWarper(p.top_p)(ids, x)
        if p.min_p > 0:
            x = MinPLogitsWarper(p.min_p)(ids, x)
        kept_ref = torch.isfinite(x[0])
        assert torch.equal(torch.isfinite(ours[i]), kept_ref), i
        torch.testing.assert_close(ours[i][kept_ref], x[0][kept_ref])
    # repetition penalty over a presence mask == transformers' processor over the token history
    hist = torch.tensor([[3, 5, 5, 50]])
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, hist[0]] = True
    p = SamplingParams(temperature=0, repetition_penalty=1.7)
    sb = SamplingBatch.build([p], V, torch.device("cpu"))
    ref = RepetitionPenaltyLogitsProcessor(1.7)(hist, logits[:1].clone())
    assert sample(logits[:1], sb, [None], seen).item() == ref.argmax().item()


def test_sampling_follows_the_distribution():
    """Gumbel-max sampling with per-row generators: frequencies match softmax; top_k=1 is greedy."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(2, 1)
    p = SamplingParams(temperature=1.0)
    sb = SamplingBatch.build([p, SamplingParams(temperature=1.0, top_k=1)], 4, torch.device("cpu"))
    g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    counts = torch.zeros(4)
    for _ in range(4000):
        tok = sample(logits, sb, g)
        counts[tok[0]] += 1
        assert tok[1].item() == 0
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


def test_incremental_detok_equals_full_decode(engine):
    tok = engine.tokenizer
    rng = random.Random(0)
    texts = ["héllo wörld ∑ 数学 \\boxed{42} <tool_call>print(1)</tool_call>", "a  b\n\n  c 3.14159 — ok"]
    for text in texts:
        prompt = tok.encode("Q: ")
        ids = tok.encode(text)
        d = IncrementalDetokenizer(tok, prompt)
        out = "".join(d.add(t) for t in ids) + d.flush()
        assert out == tok.decode(ids, skip_special_tokens=True)
    for _ in range(20):  # random ids, including ones that split UTF-8 sequences
        ids = [rng.randrange(engine.vocab_size) for _ in range(30)]
        d = IncrementalDetokenizer(tok, [])
        out = "".join(d.add(t) for t in ids) + d.flush()
        assert out == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_across_tokens_and_holdback(engine):
    tok = engine.tokenizer
    ids = tok.encode("The answer is \\boxed{12}. Done here.")
    d = IncrementalDetokenizer(tok, [], stop=["}. Do", "zzz"])
    pieces = []
    for t in ids:
        pieces.append(d.add(t))
        assert "}" not in "".join(pieces) or d.stopped  # the possible start of a stop string is held back
        if d.stopped:
            break
    assert d.stopped and d.stop_str == "}. Do"
    assert "".join(pieces) + d.flush() == "The answer is \\boxed{12"


def test_invalid_requests_are_refused(engine):
    ok = [1, 2, 3]
    bad = [
        ([], SamplingParams()),
        ([engine.vocab_size], SamplingParams()),
        ([-1], SamplingParams()),
        (ok, SamplingParams(max_tokens=0)),
        (ok, SamplingParams(max_tokens=-5)),
        (ok, SamplingParams(max_tokens=510)),
        ([1] * 512, SamplingParams(max_tokens=1)),
        (ok, SamplingParams(temperature=-0.1)),
        (ok, SamplingParams(top_p=0.0)),
        (ok, SamplingParams(top_k=-2)),
        (ok, SamplingParams(min_p=1.5)),
        (ok, SamplingParams(repetition_penalty=0.0)),
        (ok, SamplingParams(stop=[""])),
        (ok, SamplingParams(stop_token_ids=[10**9])),
        (ok, SamplingParams(seed=2**70)),
    ]
    for ids, p in bad:
        with pytest.raises(EngineInputError):
            engine.add_request("bad", ids, p)
    assert not engine.has_work()
    engine.validate(ok, SamplingParams(max_tokens=509))


def test_abort_frees_the_slot(engine, prompt_ids):
    engine.add_request("a", prompt_ids[0], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))
    engine.add_request("b", prompt_ids[1], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))
    engine.step()
    assert engine.stats()["running"] == 2
    out = engine.abort_request("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.stats()["running"] == 1 and engine.stats()["free_slots"] == 3
    assert engine.abort_request("a") is None
    engine.abort_request("b")
    assert not engine.has_work()


def test_async_engine_stream_and_disconnect(engine, prompt_ids, hf_greedy):
    async def main():
        ae = AsyncEngine(engine).start()
        try:
            text, toks = "", []
            async for out in ae.generate(prompt_ids[0], GREEDY, "r1"):
                toks += out.token_ids
                text += out.text
            assert toks == hf_greedy[0]
            # a consumer that stops early aborts its request; the slot is free right after
            aborts = engine.finished_total["abort"]
            gen = ae.generate(
                prompt_ids[1], SamplingParams(max_tokens=400, ignore_eos=True, temperature=0), "r2"
            )
            async for _ in gen:
                if ae.stats()["running"] == 1:
                    break
            await gen.aclose()
            for _ in range(200):
                if ae.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.005)
            assert ae.stats()["running"] == 0 and engine.finished_total["abort"] == aborts + 1
            with pytest.raises(EngineInputError):
                async for _ in ae.generate([], GREEDY, "r3"):
                    pass
            # the engine thread is still serving
            outs = [o async for o in ae.generate(prompt_ids[2], GREEDY, "r4")]
            assert outs[-1].finished
        finally:
            ae.shutdown()

    asyncio.run(main())


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(6) == [1, 2, 4, 6]


def test_engine_error_fails_requests_not_the_thread(engine, prompt_ids, monkeypatch):
    """An exception inside a step reaches the requests in flight; the engine thread keeps serving."""
    real = engine._prefill
    calls = {"n": 0}

    def flaky(group):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real(group)

    monkeypatch.setattr(engine, "_prefill", flaky)

    async def main():
        ae = AsyncEngine(engine).start()
        try:
            with pytest.raises(RuntimeError, match="simulated kernel failure"):
                async for _ in ae.generate(prompt_ids[0], GREEDY, "boom"):
                    pass
            assert ae.stats()["step_errors"] == 1 and ae.is_running
            outs = [o async for o in ae.generate(prompt_ids[0], GREEDY, "after")]
            assert outs[-1].finished and ae.stats()["free_slots"] == engine.max_slots
        finally:
            ae.shutdown()

    asyncio.run(main())
