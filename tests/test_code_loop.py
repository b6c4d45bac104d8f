"""The code-execution loop and the sampler against a scripted completions server and the REAL sandbox.

The scripted server (tests/scripted_openai_server.py, a real subprocess on 127.0.0.1) streams fixed
completions, honours `stop` and `max_tokens`, returns `usage` and records every request, so we can check
what the loop sends: the code output appended exactly in NeMo-Skills' format, the shrinking token budget,
the session state carried between cells, and cancellation closing the stream.

The sandbox is `mathforge sandbox` started as a subprocess; set MATHFORGE_TEST_SANDBOX_URL to run these
tests against an already-running NeMo-Skills-compatible sandbox instead.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from solve_servers import sandbox_server, scripted_server

from mathforge.solve.client import CompletionError, CompletionsClient
from mathforge.solve.code_loop import (
    OPENMATH_CODE_TAGS,
    CodeExecutionConfig,
    CodeExecutionLoop,
    Generation,
    Sampling,
    extract_code_to_execute,
    format_code_output,
)
from mathforge.solve.grading import extract_answer
from mathforge.solve.sampler import EarlyStopping, TimeBudget, solve_problem
from mathforge.solve.sandbox_client import SandboxClient

TOKEN_RE = re.compile(r"\S+\s*|\s+")  # the scripted server's "tokens"
PROMPT = "<|im_start|>user\nSolve it. [[script:{name}]]<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    with scripted_server(tmp_path_factory.mktemp("scripted")) as url:
        yield url


@pytest.fixture(scope="module")
def sandbox_url(tmp_path_factory):
    with sandbox_server(tmp_path_factory.mktemp("sandbox")) as url:
        yield url


def ntok(text: str) -> int:
    return len(TOKEN_RE.findall(text))


def set_scripts(base: str, scripts: dict) -> None:
    httpx.put(f"{base}/script", json={"scripts": scripts}, timeout=10).raise_for_status()
    httpx.post(f"{base}/reset", timeout=10).raise_for_status()


def received(base: str) -> list[dict]:
    return httpx.get(f"{base}/requests", timeout=10).json()


def stats(base: str) -> dict:
    return httpx.get(f"{base}/stats", timeout=10).json()


def run(coro):
    return asyncio.run(coro)


async def generate(
    base, sandbox_url, prompt, *, config=None, sampling=None, tokens=400, **kwargs
) -> Generation:
    async with CompletionsClient(base, "scripted") as client:
        sandbox = SandboxClient(sandbox_url) if sandbox_url else None
        try:
            loop = CodeExecutionLoop(client, sandbox, config=config or CodeExecutionConfig())
            return await loop.generate(prompt, tokens_to_generate=tokens, sampling=sampling, **kwargs)
        finally:
            if sandbox is not None:
                await sandbox.close()


# ------------------------------------------------------------------ pure helpers


def test_format_code_output_is_nemo_skills_qwen_format():
    out = format_code_output(
        {"process_status": "completed", "stdout": "42\n", "stderr": ""}, OPENMATH_CODE_TAGS
    )
    assert out == "\n```output\n42\n```\n"
    out = format_code_output({"process_status": "error", "stdout": "Trace\n", "stderr": "err\n"}, remaining=2)
    assert out == (
        "\n```output\nTrace\nerr\n```\n```system\nRemaining code executions: 2. You will not be able to call "
        "code when you run out of executions, so use it wisely. Note that you can still continue solving the "
        "problem without code after that.\n```\n"
    )
    assert "You have run out of code executions!" in format_code_output({"stdout": ""}, remaining=0)


def test_extract_code_takes_the_last_block():
    text = "<tool_call>\na = 1\n</tool_call>\n```output\n```\n<tool_call>\nprint(a)\n</tool_call>"
    assert extract_code_to_execute(text) == "\nprint(a)\n"


def test_time_budget_pools_unused_time():
    budget = TimeBudget(base_s=350, max_extra_s=210)
    first = budget.reserve()
    assert first == 350  # empty buffer
    budget.release(first, used_s=100)  # 250 s unused
    assert budget.buffer_s == 250
    second = budget.reserve()
    assert second == 560  # base + at most 210 extra
    assert budget.buffer_s == 40
    budget.release(second, used_s=560)  # used all of it
    assert budget.buffer_s == 40
    assert budget.reserve() == 390


# ------------------------------------------------------------------ the loop


CODE_TURNS = [
    "Let me compute it.\n<tool_call>\nx = 6 * 7\nprint(x)\n</tool_call>\nTEXT AFTER THE STOP IS NEVER SENT",
    "So x is 42; one more check.\n<tool_call>\nprint(x + 1)\n</tool_call>",
    "The answer is $\\boxed{43}$.",
]


def test_code_round_trip_in_nemo_skills_format(scripted, sandbox_url):
    set_scripts(scripted, {"rt": {"turns": CODE_TURNS}})
    prompt = PROMPT.format(name="rt")
    rec = run(generate(scripted, sandbox_url, prompt, tokens=400))
    reqs = received(scripted)
    assert len(reqs) == 3 and rec.llm_calls == 3

    turn0 = "Let me compute it.\n<tool_call>\nx = 6 * 7\nprint(x)\n</tool_call>"
    turn1 = "So x is 42; one more check.\n<tool_call>\nprint(x + 1)\n</tool_call>"
    # the stop string is re-appended, then exactly "\n```output\n" + stdout + stderr + "```\n"
    assert reqs[1]["prompt"] == prompt + turn0 + "\n```output\n42\n```\n"
    # the session persists across the sample's cells: x is still defined
    assert reqs[2]["prompt"] == prompt + turn0 + "\n```output\n42\n```\n" + turn1 + "\n```output\n43\n```\n"
    assert rec.generation == reqs[2]["prompt"][len(prompt) :] + CODE_TURNS[2]
    assert rec.code_rounds_executed == 2 and rec.num_code_timeouts == 0
    assert rec.completed and rec.finish_reason == "stop"
    assert extract_answer(rec.generation) == "43"

    # standard fields only; code_end is a stop string; extras are absent when unset
    for r in reqs:
        assert r["stream"] is True and r["stop"] == ["</tool_call>"] and r["model"] == "scripted"
        assert not {"top_k", "min_p", "repetition_penalty"} & set(r)
    # ONE token budget across turns: each request gets what the previous ones left (usage-counted)
    tokens0 = ntok(turn0.removesuffix("</tool_call>")) + 1  # + the stop string
    tokens1 = ntok(turn1.removesuffix("</tool_call>")) + 1
    assert [r["max_tokens"] for r in reqs] == [400, 400 - tokens0, 400 - tokens0 - tokens1]
    assert rec.num_generated_tokens == tokens0 + tokens1 + ntok(CODE_TURNS[2]) + 1  # + EOS


def test_max_code_executions_and_remaining_message(scripted, sandbox_url):
    code = "Step.\n<tool_call>\nprint({i})\n</tool_call>"
    set_scripts(scripted, {"many": {"turns": [code.format(i=i) for i in range(5)]}})
    config = CodeExecutionConfig(max_code_executions=2, add_remaining_code_executions=True)
    rec = run(generate(scripted, sandbox_url, PROMPT.format(name="many"), config=config))
    assert rec.llm_calls == 3  # max_code_executions + 1
    assert rec.code_rounds_executed == 2
    assert "\n```output\n0\n```\n```system\nRemaining code executions: 1." in rec.generation
    assert "\n```output\n1\n```\n```system\nYou have run out of code executions!" in rec.generation
    # the last completion's code block stays in the text, unexecuted
    assert rec.generation.endswith("<tool_call>\nprint(2)\n</tool_call>")
    assert rec.generation.count("```output") == 2


def test_token_budget_ends_the_loop(scripted, sandbox_url):
    set_scripts(scripted, {"rt": {"turns": CODE_TURNS}})
    # with 20 tokens turn 0 fits, and the second turn is cut by what is left of the budget
    first = ntok(CODE_TURNS[0].split("</tool_call>")[0]) + 1
    rec = run(generate(scripted, sandbox_url, PROMPT.format(name="rt"), tokens=20))
    reqs = received(scripted)
    assert [r["max_tokens"] for r in reqs] == [20, 20 - first]
    assert rec.finish_reason == "length" and rec.num_generated_tokens == 20
    assert rec.code_rounds_executed == 1
    assert not rec.generation.endswith("</tool_call>")  # cut code is not closed nor run


def test_code_cut_by_budget_is_not_run(scripted, sandbox_url):
    set_scripts(scripted, {"rt": {"turns": CODE_TURNS}})
    rec = run(generate(scripted, sandbox_url, PROMPT.format(name="rt"), tokens=8))
    assert len(received(scripted)) == 1
    assert rec.code_rounds_executed == 0 and rec.finish_reason == "length"
    assert "</tool_call>" not in rec.generation


def test_errors_and_timeouts_are_fed_back(scripted, sandbox_url):
    turns = [
        "Try.\n<tool_call>\n1 / 0\n</tool_call>",
        "Again.\n<tool_call>\nimport time\ntime.sleep(30)\n</tool_call>",
        "Give up: \\boxed{0}",
    ]
    set_scripts(scripted, {"err": {"turns": turns}})
    config = CodeExecutionConfig(code_execution_timeout=1.0)
    started = time.monotonic()
    rec = run(generate(scripted, sandbox_url, PROMPT.format(name="err"), config=config))
    assert time.monotonic() - started < 20
    assert "ZeroDivisionError" in rec.generation
    assert "timed out" in rec.generation.lower()
    assert rec.code_rounds_executed == 2 and rec.num_code_timeouts == 1
    assert rec.generation.endswith("Give up: \\boxed{0}")


def test_no_sandbox_means_plain_completion(scripted):
    set_scripts(scripted, {"rt": {"turns": CODE_TURNS}})
    rec = run(
        generate(scripted, None, PROMPT.format(name="rt"), sampling=Sampling(stop_phrases=("<|im_end|>",)))
    )
    reqs = received(scripted)
    assert len(reqs) == 1 and reqs[0]["stop"] == ["<|im_end|>"]
    assert rec.code_rounds_executed == 0 and rec.generation == CODE_TURNS[0]


def test_sampling_extras_only_when_set(scripted):
    set_scripts(scripted, {"a": {"turns": ["\\boxed{1}"]}})
    sampling = Sampling(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1, seed=7)
    run(generate(scripted, None, PROMPT.format(name="a"), sampling=sampling))
    (req,) = received(scripted)
    assert (req["temperature"], req["top_p"], req["top_k"], req["min_p"], req["repetition_penalty"]) == (
        0.6,
        0.95,
        20,
        0.05,
        1.1,
    )
    assert req["seed"] == 7 and "stop" not in req


def test_without_usage_tokens_are_counted_per_chunk_and_stop_reason_is_used(scripted, sandbox_url):
    set_scripts(scripted, {"rt": {"turns": CODE_TURNS, "usage": False, "stop_reason": True}})
    rec = run(generate(scripted, sandbox_url, PROMPT.format(name="rt"), tokens=400))
    reqs = received(scripted)
    # one token per streamed chunk (NeMo-Skills' estimate); the stop itself streams nothing
    t0, t1 = (ntok(t.split("</tool_call>")[0]) for t in CODE_TURNS[:2])
    assert [r["max_tokens"] for r in reqs] == [400, 400 - t0, 400 - t0 - t1]
    assert rec.code_rounds_executed == 2 and rec.num_generated_tokens == t0 + t1 + ntok(CODE_TURNS[2])


def test_server_error_is_a_completion_error(scripted):
    set_scripts(scripted, {"a": {"turns": ["x"]}})

    async def go():
        async with CompletionsClient(scripted + "/v1", "scripted") as client:
            await client.complete(PROMPT.format(name="a"), max_tokens=0)

    with pytest.raises(CompletionError) as info:
        run(go())
    assert info.value.status_code == 400 and "max_tokens" in str(info.value)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_cancelling_closes_the_stream(scripted):
    set_scripts(scripted, {"slow": {"turns": ["tok " * 400], "delay": 0.02}})

    async def go():
        rec = Generation()
        async with CompletionsClient(scripted, "scripted") as client:
            task = asyncio.create_task(
                CodeExecutionLoop(client).generate(
                    PROMPT.format(name="slow"), tokens_to_generate=1000, record=rec
                )
            )
            while len(rec.generation) < 20:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return rec

    rec = run(go())
    assert not rec.completed and 0 < rec.num_generated_tokens < 400
    assert wait_for(lambda: stats(scripted)["cancelled"] == 1 and stats(scripted)["active"] == 0)


def test_cancelling_during_code_execution_deletes_the_session(scripted, sandbox_url):
    set_scripts(
        scripted, {"sleepy": {"turns": ["Wait.\n<tool_call>\nimport time\ntime.sleep(20)\n</tool_call>"]}}
    )

    async def go():
        rec = Generation()
        async with CompletionsClient(scripted, "scripted") as client, SandboxClient(sandbox_url) as sandbox:
            config = CodeExecutionConfig(code_execution_timeout=30.0)
            loop = CodeExecutionLoop(client, sandbox, config=config)
            task = asyncio.create_task(
                loop.generate(PROMPT.format(name="sleepy"), tokens_to_generate=100, record=rec)
            )
            while rec.session_id is None or rec.session_id not in sessions():
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # let the cell start running
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return rec

    def sessions() -> dict:
        return httpx.get(f"{sandbox_url}/sessions", timeout=10).json()["sessions"]

    started = time.monotonic()
    rec = run(go())
    assert time.monotonic() - started < 10
    assert rec.code_rounds_executed == 0 and not rec.completed
    assert rec.session_id not in sessions()


# ------------------------------------------------------------------ many samples + early stopping


def _sampler_scripts(fast_answers: dict[int, str], slow: str = "tok " * 900) -> dict:
    by_seed = {str(s): [f"Quick: \\boxed{{{a}}}"] for s, a in fast_answers.items()}
    return {"multi": {"turns": [slow], "by_seed": by_seed, "delay": 0.02}}


async def _solve(base, samples, early, **kwargs):
    async with CompletionsClient(base, "scripted") as client:
        loop = CodeExecutionLoop(client)
        return await solve_problem(
            loop,
            PROMPT.format(name="multi"),
            samples=samples,
            tokens_to_generate=1000,
            early_stopping=early,
            **kwargs,
        )


def test_stop_after_n_same_answer_cancels_the_stragglers(scripted):
    # seeds 0..2 answer fast (two agree on 1/2 in different forms), the other five are slow
    set_scripts(scripted, _sampler_scripts({0: "0.5", 1: "9", 2: "\\frac{1}{2}"}))
    started = time.monotonic()
    result = run(_solve(scripted, 8, EarlyStopping(stop_after_n_same_answer=2)))
    assert time.monotonic() - started < 9  # a slow sample alone takes 900 x 0.02 s = 18 s
    assert result.stop_reason == "same_answer"
    assert result.answer in ("0.5", "\\frac{1}{2}")
    assert [s.completed for s in result.samples] == [True] * 3 + [False] * 5
    assert all(s.cancelled and s.finish_reason == "cancelled" for s in result.samples[3:])
    assert wait_for(lambda: stats(scripted) == {"active": 0, "finished": 3, "cancelled": 5})


def test_stop_after_n_completed(scripted):
    set_scripts(scripted, _sampler_scripts({0: "1", 1: "2"}))
    result = run(_solve(scripted, 5, EarlyStopping(stop_after_n_completed=2)))
    assert result.stop_reason == "n_completed"
    assert sum(s.completed for s in result.samples) == 2 and sum(s.cancelled for s in result.samples) == 3
    assert wait_for(lambda: stats(scripted)["cancelled"] == 3 and stats(scripted)["active"] == 0)


def test_stop_after_n_seconds_keeps_partial_answers(scripted):
    set_scripts(
        scripted, {"multi": {"turns": ["I think \\boxed{5} but let me go on " + "tok " * 900], "delay": 0.01}}
    )
    started = time.monotonic()
    result = run(_solve(scripted, 3, EarlyStopping(stop_after_n_seconds=0.8)))
    assert 0.7 < time.monotonic() - started < 6  # not the 9 s the samples would take
    assert result.stop_reason == "time"
    assert all(s.cancelled for s in result.samples)
    # time-constrained generation: the answer comes from the text the samples have so far
    assert result.answer == "5" and all(s.predicted_answer == "5" for s in result.samples)
    assert wait_for(lambda: stats(scripted)["active"] == 0)


def test_time_limit_from_budget(scripted):
    set_scripts(scripted, _sampler_scripts({}))
    result = run(_solve(scripted, 2, EarlyStopping(), time_limit_s=0.5))
    assert result.stop_reason == "time" and result.elapsed_s < 5  # the samples alone: 18 s


def test_all_done_without_early_stopping(scripted):
    set_scripts(scripted, {"multi": {"turns": ["\\boxed{3}"], "by_seed": {"1": ["\\boxed{4}"]}}})
    result = run(_solve(scripted, 3, EarlyStopping()))
    assert result.stop_reason == "all_done"
    assert [s.predicted_answer for s in result.samples] == ["3", "4", "3"]
    assert result.answer == "3"
    assert [s.seed for s in result.samples] == [0, 1, 2]


def test_evaluate_time_budget_pools_unused_time(scripted, tmp_path):
    from mathforge.solve.evaluate import evaluate_problems

    set_scripts(
        scripted,
        {"fast": {"turns": ["\\boxed{4}"]}, "slow": {"turns": ["tok " * 900 + "\\boxed{5}"], "delay": 0.01}},
    )
    problems = [
        {"id": "p0", "problem": "fast one", "expected_answer": "4"},
        {"id": "p1", "problem": "slow one", "expected_answer": "5"},
    ]
    prompts = [PROMPT.format(name="fast"), PROMPT.format(name="slow")]
    out = tmp_path / "rows.jsonl"
    metrics = evaluate_problems(
        scripted,
        "scripted",
        problems,
        prompts,
        samples=2,
        tokens_to_generate=1000,
        time_budget_s=1.5,
        time_budget_max_extra_s=1.5,
        out_jsonl=out,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample_index"]) for r in rows] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    fast, slow = rows[0], rows[2]
    assert fast["is_correct"] and fast["problem_stop_reason"] == "all_done"
    # the fast problem left 1.5 s minus its own time unused: the slow one may run that much past its 1.5 s
    # (it would need 9 s); the upper margin is for a loaded machine
    allowed = 1.5 + (1.5 - fast["problem_time_s"])
    assert slow["problem_stop_reason"] == "time" and allowed - 0.15 < slow["problem_time_s"] < allowed + 1.5
    assert slow["problem_time_s"] > 2.0  # more than its own budget
    assert slow["cancelled"] and slow["finish_reason"] == "cancelled" and not slow["is_correct"]
    assert metrics["accuracy"] == 0.5 and metrics["num_cancelled"] == 2 and metrics["early_stopped"] == 1
