"""Solving against the REAL `mathforge serve` on the tiny model (CPU), and the real sandbox.

These tests check the plumbing — concurrency, early stopping, cancelled streams freeing the server's slots
at once, and the JSONL/metrics of a whole `evaluate_problems` run — not the model's accuracy (the trained
tiny model's accuracy is measured by `mathforge evaluate`, see mathforge/data/tiny_model/README.md).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from solve_servers import model_server, prometheus, sandbox_server
from transformers import AutoTokenizer

from mathforge.data.problems import load_problems
from mathforge.data.prompts import render_chat
from mathforge.solve.client import CompletionsClient
from mathforge.solve.code_loop import CodeExecutionLoop, Sampling
from mathforge.solve.evaluate import METRIC_NAMES, evaluate_problems
from mathforge.solve.sampler import EarlyStopping, solve_problem

pytestmark = pytest.mark.integration

MAX_SLOTS = 2


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    with model_server(tiny_model_dir, tmp_path_factory.mktemp("serve"), max_slots=MAX_SLOTS) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def problems():
    return load_problems("tiny", split="test")[:3]


def slots_free_again(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Poll /metrics until every slot is free and nothing waits; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = prometheus(url)
        idle = m["mathforge_requests_running"] == 0 and m["mathforge_requests_waiting"] == 0
        if idle and m["mathforge_slots_free"] == m["mathforge_slots_total"] or time.monotonic() > deadline:
            return m


def _solve(url, prompt, samples, early, extract=None):
    async def go():
        async with CompletionsClient(url, "tiny") as client:
            kwargs = {"extract": extract} if extract else {}
            return await solve_problem(
                CodeExecutionLoop(client),
                prompt,
                samples=samples,
                tokens_to_generate=300,
                sampling=Sampling(temperature=1.0),
                early_stopping=early,
                **kwargs,
            )

    started = time.monotonic()
    result = asyncio.run(go())
    return result, time.monotonic() - started


def _check_cancelled_slots_freed(served, result, before):
    cancelled = [s for s in result.samples if s.cancelled]
    # /metrics right after the solve returned: the cancelled requests hold no slot and wait in no queue
    after = slots_free_again(served, timeout=2.0)
    assert after["mathforge_requests_running"] == 0
    assert after["mathforge_requests_waiting"] == 0
    assert after["mathforge_slots_free"] == MAX_SLOTS
    aborted = after['mathforge_requests_finished_total{finish_reason="abort"}'] - before.get(
        'mathforge_requests_finished_total{finish_reason="abort"}', 0
    )
    # every cancelled request that had started generating was aborted by the server
    assert aborted >= len([s for s in cancelled if s.record.num_generated_tokens > 0])


def test_stop_after_n_completed_frees_the_cancelled_slots(served, tokenizer, problems):
    prompt = render_chat(tokenizer, problems[0].problem, tools=True)
    before = prometheus(served)
    samples = 6  # 3x the server's slots: some run, some queue
    result, elapsed = _solve(served, prompt, samples, EarlyStopping(stop_after_n_completed=2))
    assert result.stop_reason == "n_completed"
    assert sum(s.completed for s in result.samples) == 2
    assert sum(s.cancelled for s in result.samples) == samples - 2
    _check_cancelled_slots_freed(served, result, before)


def test_stop_after_n_same_answer_frees_the_cancelled_slots(served, tokenizer, problems):
    # Reading any finished sample's text as the answer "x" makes finished samples agree whatever the model
    # writes, which is all the early-stopping path needs from it.
    prompt = render_chat(tokenizer, problems[1].problem, tools=True)
    before = prometheus(served)
    samples = 6
    result, elapsed = _solve(
        served,
        prompt,
        samples,
        EarlyStopping(stop_after_n_same_answer=2),
        extract=lambda text: "x" if text else None,
    )
    assert result.stop_reason == "same_answer"
    assert result.answer == "x"
    finished = [s for s in result.samples if s.completed]
    assert len(finished) == 2
    assert sum(s.cancelled for s in result.samples) == samples - 2
    _check_cancelled_slots_freed(served, result, before)


def test_evaluate_problems_writes_jsonl_and_metrics(served, tokenizer, problems, tmp_path_factory):
    sandbox_dir = tmp_path_factory.mktemp("sandbox-eval")
    out = tmp_path_factory.mktemp("eval") / "rows.jsonl"
    prompts = [render_chat(tokenizer, p.problem, tools=True) for p in problems]
    seen = []
    with sandbox_server(sandbox_dir) as sandbox_url:
        metrics = evaluate_problems(
            served,
            "tiny",
            problems,
            prompts,
            sandbox_url=sandbox_url,
            samples=2,
            temperature=1.0,
            tokens_to_generate=48,
            max_code_executions=2,
            code_execution_timeout=2.0,
            out_jsonl=out,
            progress=lambda done, total: seen.append((done, total)),
        )
    assert set(METRIC_NAMES) <= set(metrics)
    assert metrics["num_problems"] == 3 and metrics["num_samples"] == 2 and metrics["num_generations"] == 6
    assert 0.0 <= metrics["accuracy"] <= metrics["pass_at_k"] <= 1.0
    assert 0.0 <= metrics["maj_at_k"] <= 1.0
    assert 0 < metrics["mean_tokens"] <= 48
    assert metrics["time_per_problem_s"] > 0 and metrics["num_errors"] == 0
    assert seen[-1] == (3, 3)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample_index"]) for r in rows] == [(p.id, i) for p in problems for i in range(2)]
    fields = {
        "id",
        "problem_id",
        "problem",
        "expected_answer",
        "generation",
        "predicted_answer",
        "is_correct",
        "symbolic_correct",
        "code_rounds_executed",
        "num_code_timeouts",
        "num_generated_tokens",
        "generation_time",
        "sample_index",
        "seed",
        "finish_reason",
        "completed",
        "cancelled",
        "error",
    }
    for row in rows:
        assert fields <= set(row)
        assert row["finish_reason"] in ("stop", "length")
        assert row["completed"] and not row["cancelled"] and row["error"] is None
        assert 0 <= row["num_generated_tokens"] <= 48
        assert isinstance(row["is_correct"], bool)
    assert metrics["mean_tokens"] == pytest.approx(sum(r["num_generated_tokens"] for r in rows) / 6)
