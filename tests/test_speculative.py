"""Speculative decoding with a ReDrafter drafter in the torch engine: exactness against plain decoding
(float32, BF16, FP8; alone and continuously batched), truncation inside an accepted run, the exact
speculative-sampling rule, acceptance reporting, and `mathforge serve --drafter` end to end.

Two drafters: a randomly initialised `Drafter` (the real class and its weights' dtype/device plumbing;
nearly every draft is rejected) and `TableDrafter`, a Drafter whose `draft` follows a next-token table
read off the plain engine's own outputs — right often, wrong sometimes, so runs of accepted drafts,
partial acceptance and rejections all happen, deterministically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mathforge.drafter.model import Drafter, DrafterConfig
from mathforge.engine.api import SamplingParams
from mathforge.engine.config import ModelConfig
from mathforge.engine.engine import Engine
from mathforge.engine.speculative import speculative_sample, verify_greedy, verify_positions
from mathforge.errors import UserError

PROMPTS = [
    "What is 2+3?",
    "Compute the sum of the first 10 primes.",
    "x",
    "Let f(x) = x^2 + 1. Find f(3), then put the answer in \\boxed{}.",
    "Solve for n: 3n + 7 = 22.",
]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0)
K = 3


class TableDrafter(Drafter):
    """Drafts by following a next-token table (ignores the hidden state)."""

    def __init__(self, config: DrafterConfig, table: dict[int, int]):
        super().__init__(config)
        self.table = table

    @torch.no_grad()
    def draft(self, hidden, token, embed, k):
        rows = []
        for t in token.tolist():
            row = []
            for _ in range(k):
                t = self.table.get(t, 0)
                row.append(t)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.int64, device=token.device)


class TensorTableDrafter(TableDrafter):
    """The same table as a tensor: drafting with device ops only, as a CUDA graph captures it."""

    def __init__(self, config: DrafterConfig, table: dict[int, int]):
        super().__init__(config, table)
        lookup = torch.zeros(config.vocab_size, dtype=torch.int64)
        lookup[list(table)] = torch.tensor(list(table.values()))
        self.register_buffer("lookup", lookup)

    @torch.no_grad()
    def draft(self, hidden, token, embed, k):
        drafts = [token]
        for _ in range(k):
            drafts.append(self.lookup[drafts[-1]])
        return torch.stack(drafts[1:], dim=1)


def next_token_table(outputs: list[list[int]]) -> dict[int, int]:
    table: dict[int, int] = {}
    for ids in outputs:
        for a, b in zip(ids, ids[1:], strict=False):
            table.setdefault(a, b)  # the first successor seen: later different ones are drafted wrong
    return table


def make_engine(model_dir, dtype="float32", drafter=None, **kw) -> Engine:
    kw = {"max_slots": 4, "max_model_len": 512, **kw}
    return Engine.from_pretrained(model_dir, dtype=dtype, drafter=drafter, draft_len=K, **kw)


@pytest.fixture(scope="module")
def base_config(tiny_model_dir) -> ModelConfig:
    return ModelConfig.from_pretrained(Path(tiny_model_dir))


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def plain32(tiny_model_dir) -> Engine:
    return make_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def ref32(plain32, prompt_ids) -> list:
    return [plain32.generate([ids], GREEDY)[0] for ids in prompt_ids]


@pytest.fixture(scope="module")
def table_drafter(base_config, ref32) -> TableDrafter:
    return TableDrafter(DrafterConfig.for_base(base_config), next_token_table([o.token_ids for o in ref32]))


@pytest.fixture(scope="module")
def spec32(tiny_model_dir, table_drafter) -> Engine:
    return make_engine(tiny_model_dir, drafter=table_drafter)


def check_accounting(out) -> None:
    """Every token after the prefill's first comes from a verify forward, 1..K+1 at a time."""
    assert sum(out.accept_lens) == len(out.token_ids) - 1
    assert all(1 <= n <= K + 1 for n in out.accept_lens)


# ------------------------------------------------------------------ pure parts


def test_verify_greedy_accepts_the_longest_matching_prefix():
    V = 8
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5], [1, 2, 3, 4]])
    logits = torch.nn.functional.one_hot(target, V).float()
    drafts = torch.tensor([[1, 2, 3], [1, 7, 3], [0, 5, 5], [1, 2, 0]])
    tokens, n_emit = verify_greedy(logits, drafts)
    assert n_emit.tolist() == [4, 2, 1, 3]  # all + bonus; 1 + correction; correction only; 2 + correction
    assert torch.equal(tokens, target)
    assert verify_positions([5, 509], 4, 511) == [[5, 6, 7, 8], [509, 510, 511, 511]]


def test_speculative_sampling_is_exact():
    """Emitted tokens follow the target distribution whatever the (deterministic) draft proposes."""
    g = torch.Generator().manual_seed(0)
    V, N = 5, 200_000
    p0 = torch.tensor([0.1, 0.4, 0.2, 0.25, 0.05])
    p1 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])
    p2 = torch.tensor([0.05, 0.05, 0.6, 0.2, 0.1])
    probs = torch.stack([p0, p1, p2]).expand(N, 3, V)
    drafts = torch.tensor([1, 4]).expand(N, 2)  # a likely first draft, a so-so second
    u = torch.rand(N, 2, generator=g)
    noise = torch.empty(N, 3, V).exponential_(generator=g)
    tokens, n_emit = speculative_sample(probs, drafts, u, noise)
    first = torch.bincount(tokens[:, 0], minlength=V).float() / N
    assert (first - p0).abs().max() < 0.005
    # P(draft 1 accepted) = p0[1]; given that, the second token is distributed as p1
    accepted = n_emit >= 2
    assert abs(accepted.float().mean().item() - p0[1].item()) < 0.005
    second = torch.bincount(tokens[accepted, 1], minlength=V).float() / accepted.sum()
    assert (second - p1).abs().max() < 0.006
    # all accepted: the bonus token is drawn from p2
    bonus = tokens[n_emit == 3, 2]
    assert abs((n_emit == 3).float().mean().item() - p0[1].item() * p1[4].item()) < 0.005
    assert (torch.bincount(bonus, minlength=V).float() / len(bonus) - p2).abs().max() < 0.02
    # a draft the target rules out (p = 0) is never accepted
    zero = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]).expand(1000, 2, V)
    t, n = speculative_sample(
        zero, torch.zeros(1000, 1, dtype=torch.int64), torch.zeros(1000, 1), noise[:1000, :2]
    )
    assert (n == 1).all() and set(t[:, 0].tolist()) <= {1, 2}


# ------------------------------------------------------------------ greedy exactness


def test_random_drafter_float32_equals_plain(tiny_model_dir, base_config, prompt_ids, ref32):
    torch.manual_seed(0)
    eng = make_engine(tiny_model_dir, drafter=Drafter(DrafterConfig.for_base(base_config)))
    outs = eng.generate(prompt_ids, GREEDY)  # 5 prompts on 4 slots: batched, one joins when a slot frees
    for out, ref in zip(outs, ref32, strict=True):
        assert out.token_ids == ref.token_ids and out.text == ref.text
        assert out.finish_reason == ref.finish_reason
        check_accounting(out)


def test_table_drafter_accepts_runs_and_stays_exact(spec32, prompt_ids, ref32):
    for ids, ref in zip(prompt_ids, ref32, strict=True):  # alone
        (out,) = spec32.generate([ids], GREEDY)
        assert (out.token_ids, out.text, out.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
        check_accounting(out)
    outs = spec32.generate(prompt_ids, GREEDY)  # batched
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref32]
    lens = [n for o in outs for n in o.accept_lens]
    assert max(lens) == K + 1 and min(lens) == 1  # whole runs accepted, and rejections
    assert sum(lens) / len(lens) > 1.5
    s = spec32.stats()["speculative"]
    # accepted = drafts the target confirmed; emitted = tokens kept (a stop can drop confirmed ones)
    assert (
        s["verify_steps_total"]
        < s["emitted_tokens_total"]
        <= s["verify_steps_total"] + s["accepted_tokens_total"]
    )
    assert s["draft_tokens_total"] == K * s["verify_steps_total"]


def test_requests_joining_mid_way(spec32, prompt_ids, ref32):
    """New requests are prefilled while others decode speculatively; every output equals its plain one."""
    eng = spec32
    got: dict[str, list[int]] = {}
    order = [(0, 0), (1, 2), (2, 3), (5, 4), (6, 1)]  # (step at which it arrives, prompt)
    step, pending = 0, list(order)
    while pending or eng.has_work():
        while pending and pending[0][0] <= step:
            _, i = pending.pop(0)
            eng.add_request(f"join-{i}", prompt_ids[i], GREEDY)
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    assert {rid: toks for rid, toks in got.items()} == {f"join-{i}": ref32[i].token_ids for _, i in order}


def test_drafting_from_graphs_equals_eager_drafting(
    tiny_model_dir, base_config, table_drafter, prompt_ids, ref32
):
    """Drafts replayed from graphs (eager-replay backend: the real buffer plumbing, no GPU) are the eager
    drafts: same tokens and the same accepted runs; a stale input buffer would change the drafts."""
    drafter = TensorTableDrafter(DrafterConfig.for_base(base_config), table_drafter.table)
    eager, graphed = (
        make_engine(tiny_model_dir, drafter=drafter),
        make_engine(tiny_model_dir, drafter=drafter),
    )
    graphed.use_draft_graphs("eager-replay")
    graphs = graphed.draft_graphs
    assert len(graphs.graphs) == graphs.eager_calls == len(graphed.buckets)  # captured ahead, per bucket
    a, b = eager.generate(prompt_ids, GREEDY), graphed.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in b] == [r.token_ids for r in ref32]
    assert [o.accept_lens for o in b] == [o.accept_lens for o in a]
    assert max(n for o in b for n in o.accept_lens) == K + 1
    assert graphs.replays > 0 and graphs.eager_calls == len(graphed.buckets)  # every step replayed
    graphed.use_draft_graphs("none")
    assert graphed.draft_graphs is None


def test_block_layout_float32_equals_plain(tiny_model_dir, table_drafter, prompt_ids, ref32):
    """The [B, k+1] verify layout (the CUDA default) gives the same tokens in float32."""
    eng = make_engine(tiny_model_dir, drafter=table_drafter, verify_rows=False)
    assert not eng.verify_rows
    outs = eng.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref32]


def test_bf16_equals_plain(tiny_model_dir, table_drafter, prompt_ids):
    plain = make_engine(tiny_model_dir, "bfloat16")
    spec = make_engine(tiny_model_dir, "bfloat16", drafter=table_drafter)
    ref = [plain.generate([ids], GREEDY)[0].token_ids for ids in prompt_ids]
    assert [spec.generate([ids], GREEDY)[0].token_ids for ids in prompt_ids] == ref
    assert [o.token_ids for o in spec.generate(prompt_ids, GREEDY)] == ref


@pytest.fixture(scope="module")
def fp8_dir(tiny_model_dir, prompt_ids, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from mathforge.quantize import calibrate_fp8

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in PROMPTS]
    d = tmp_path_factory.mktemp("fp8")
    pq.write_table(pa.table({"text": texts}), d / "calib.parquet")
    calibrate_fp8(tiny_model_dir, d / "calib.parquet", d / "out", max_seq_len=128)
    return d / "out"


def test_fp8_equals_plain(fp8_dir, table_drafter, prompt_ids):
    """FP8 weights (CPU emulation of the scaled GEMMs), BF16 activations: batched and alone."""
    params = SamplingParams(max_tokens=24, temperature=0.0)
    plain = make_engine(fp8_dir, "bfloat16")
    assert plain.model.fp8
    ref = [o.token_ids for o in plain.generate(prompt_ids, params)]
    spec = make_engine(fp8_dir, "bfloat16", drafter=table_drafter)
    outs = spec.generate(prompt_ids, params)
    assert [o.token_ids for o in outs] == ref
    assert spec.generate([prompt_ids[3]], params)[0].token_ids == ref[3]
    assert sum(n for o in outs for n in o.accept_lens) > sum(len(o.accept_lens) for o in outs)


# ------------------------------------------------------------------ truncation inside an accepted run


def inside_runs(out) -> list[int]:
    """Indices of tokens that are not the last of their verify run (stopping there drops accepted ones)."""
    inside, at = [], 1  # token 0 came from the prefill
    for n in out.accept_lens:
        inside += range(at, at + n - 1)
        at += n
    return inside


def test_max_tokens_and_stop_inside_an_accepted_run(spec32, prompt_ids, ref32):
    i = max(range(len(ref32)), key=lambda j: len(ref32[j].token_ids))
    ref = ref32[i].token_ids
    full = spec32.generate([prompt_ids[i]], GREEDY)[0]
    inside = inside_runs(full)
    assert inside, "no run of two or more accepted tokens"
    # max_tokens ends the request in the middle of a run
    cut = inside[0]
    (out,) = spec32.generate([prompt_ids[i]], SamplingParams(max_tokens=cut + 1, temperature=0))
    assert out.token_ids == ref[: cut + 1] and out.finish_reason == "length"
    check_accounting(out)
    # a stop token id inside a run (its first occurrence): kept as the last token, its text not returned
    cut = next(c for c in inside if ref[c] not in ref[:c])
    p = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[ref[cut]])
    (out,) = spec32.generate([prompt_ids[i]], p)
    assert out.token_ids == ref[: cut + 1] and out.finish_reason == "stop"
    assert out.text == spec32.tokenizer.decode(ref[:cut], skip_special_tokens=True)
    check_accounting(out)
    # a stop string: the text is cut before it, as the plain engine cuts it
    text = ref32[i].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    got = spec32.generate([prompt_ids[i]], SamplingParams(max_tokens=40, temperature=0, stop=[stop]))[0]
    assert got.finish_reason == "stop" and got.text == text[: text.find(stop)]
    assert got.token_ids == ref[: len(got.token_ids)] and len(got.token_ids) < len(ref)


def test_end_of_context_falls_back_cleanly(tiny_model_dir, table_drafter, prompt_ids):
    """Requests that fill the context to max_model_len: the verify positions past its end are clamped."""
    ctx = 48
    plain = make_engine(tiny_model_dir, max_model_len=ctx, kv_block=16)
    spec = make_engine(tiny_model_dir, drafter=table_drafter, max_model_len=ctx, kv_block=16)
    params = [SamplingParams(max_tokens=ctx - len(ids), temperature=0, ignore_eos=True) for ids in prompt_ids]
    ref = plain.generate(prompt_ids, params)
    outs = spec.generate(prompt_ids, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert all(o.finish_reason == "length" and o.prompt_tokens + o.completion_tokens == ctx for o in outs)


# ------------------------------------------------------------------ sampling, penalties, aborts


def test_seeded_sampling_is_reproducible_and_valid(spec32, prompt_ids):
    p = SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=7)
    solo = spec32.generate([prompt_ids[0]], p)[0]
    mixed = spec32.generate(
        prompt_ids[:3], [p, SamplingParams(max_tokens=24, temperature=1.0, seed=3), GREEDY]
    )
    assert mixed[0].token_ids == solo.token_ids
    check_accounting(solo)
    assert all(0 <= t < spec32.vocab_size for t in solo.token_ids)
    other = spec32.generate([prompt_ids[0]], SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=8))
    assert other[0].token_ids != solo.token_ids


def test_sampled_tokens_stay_in_the_warped_support(spec32, prompt_ids):
    """top_k=2: every token must be one of the target's two best at its position (checked by re-scoring)."""
    p = SamplingParams(max_tokens=20, temperature=1.5, top_k=2, seed=11, ignore_eos=True)
    out = spec32.generate([prompt_ids[3]], p)[0]
    seq = prompt_ids[3] + out.token_ids
    assert not spec32.has_work()  # slot 0 of the idle engine is free to score the sequence in
    logits = spec32.model(torch.tensor([seq]), torch.arange(len(seq))[None], torch.tensor([0]), 512)
    n = len(prompt_ids[3])
    top2 = logits[0, n - 1 : len(seq) - 1].topk(2).indices
    assert all(t in row.tolist() for t, row in zip(out.token_ids, top2, strict=True))


def test_repetition_penalty_rows_fall_back_and_match_plain(plain32, spec32, prompt_ids):
    params = [
        SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.3),
        SamplingParams(max_tokens=24, temperature=0.9, repetition_penalty=1.2, seed=5),
        GREEDY,
    ]
    ref = plain32.generate(prompt_ids[:3], params)
    outs = spec32.generate(prompt_ids[:3], params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert set(outs[0].accept_lens) == {1} and set(outs[1].accept_lens) == {1}


def test_abort_mid_speculation_frees_the_slot(spec32, prompt_ids, ref32):
    spec32.add_request("gone", prompt_ids[1], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    spec32.add_request("stays", prompt_ids[0], GREEDY)
    spec32.step()
    spec32.step()
    assert spec32.abort_request("gone").finish_reason == "abort"
    toks = []
    while spec32.has_work():
        toks += [t for o in spec32.step() for t in o.token_ids]
    assert toks[: len(ref32[0].token_ids)] and spec32.stats()["free_slots"] == spec32.max_slots


def test_bad_drafter_settings_are_refused(tiny_model_dir, base_config):
    other = DrafterConfig(hidden_size=64, vocab_size=base_config.vocab_size, exit_dim=128)
    with pytest.raises(UserError, match="hidden_size 64"):
        make_engine(tiny_model_dir, drafter=Drafter(other))
    with pytest.raises(UserError, match="draft_len"):
        Engine.from_pretrained(
            tiny_model_dir, max_slots=1, max_model_len=64, dtype="float32",
            drafter=Drafter(DrafterConfig.for_base(base_config)), draft_len=0,
        )  # fmt: skip


# ------------------------------------------------------------------ the server


def test_serve_with_drafter_reports_acceptance(tiny_model_dir, base_config, plain32, prompt_ids, tmp_path):
    from _serve import start_server

    torch.manual_seed(1)
    Drafter(DrafterConfig.for_base(base_config)).save_pretrained(tmp_path / "drafter", dtype=torch.float32)
    proc, url = start_server(tiny_model_dir, "--drafter", str(tmp_path / "drafter"), "--draft-len", str(K))
    try:
        prompt = PROMPTS[1]
        body = {"model": "tiny-test", "prompt": prompt, "max_tokens": 20, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        want = plain32.generate([prompt_ids[1]], SamplingParams(max_tokens=20, temperature=0))[0]
        assert r["choices"][0]["text"] == want.text
        usage = r["usage"]
        assert usage["completion_tokens"] == len(want.token_ids)
        assert 1.0 <= usage["accept_len_mean"] <= K + 1
        # streamed, with usage in the last chunk (what the bench client reads)
        events = []
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
            timeout=60,
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert "".join(c["choices"][0]["text"] for c in events if c["choices"]) == want.text
        assert 1.0 <= events[-1]["usage"]["accept_len_mean"] <= K + 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("mathforge_spec_decode_")
        }
        # two identical requests: every token after each one's first came from a verify forward
        emitted = values["mathforge_spec_decode_emitted_tokens_total"]
        assert emitted == 2 * (len(want.token_ids) - 1)
        verify = values["mathforge_spec_decode_verify_steps_total"]
        assert math.isclose(verify, emitted / usage["accept_len_mean"])
        assert values["mathforge_spec_decode_draft_tokens_total"] == K * verify
        assert math.isclose(values["mathforge_spec_decode_accept_len_mean"], emitted / verify, rel_tol=1e-5)
        assert values["mathforge_spec_decode_draft_len"] == K
    finally:
        proc.stop()
