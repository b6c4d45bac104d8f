"""`mathforge serve` as a real subprocess, driven with the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
import torch
from _serve import MODEL_NAME, start_server

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 1024
PROMPTS = ["What is 2+3?", "Compute 17 * 23.", "Let f(x) = x^2 + 1. Find f(3).", "Solve for n: 3n + 7 = 22."]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, url = start_server(tiny_model_dir, "--max-slots", "4", "--max-model-len", str(MAX_MODEL_LEN))
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def hf_greedy_text(hf, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    model, tok = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt_ids) :].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def metric(server: str, name: str, labels: str = "") -> float:
    text = httpx.get(server + "/metrics").text
    want = f'{name}{{model_name="{MODEL_NAME}"{"," + labels if labels else ""}}}'
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{want} not in /metrics")


def wait_idle(server: str, timeout: float = 3.0) -> float:
    """Seconds until no request holds a slot (fails after `timeout`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metric(server, "mathforge_requests_running") == 0 and metric(server, "mathforge_slots_free") == 4:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError("a slot is still busy")


def test_health_and_models(server, client):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_greedy_matches_transformers(client, hf):
    tok = hf[1]
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0)
        ref_text, n = hf_greedy_text(hf, tok.encode(prompt), 20)
        assert r.choices[0].text == ref_text
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == n
        assert r.usage.total_tokens == r.usage.prompt_tokens + n
        assert r.choices[0].finish_reason in ("stop", "length")
    # a prompt given as token ids
    ids = tok.encode(PROMPTS[2])
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == hf_greedy_text(hf, ids, 12)[0]


def test_streamed_completion(client):
    kw = dict(
        model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert full.usage.completion_tokens == 16


def test_chat_completions(client, hf):
    tok = hf[1]
    messages = [
        {"role": "system", "content": "You are a math assistant."},
        {"role": "user", "content": "2+2?"},
    ]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    prompt_ids = tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == hf_greedy_text(hf, prompt_ids, 12)[0]
    assert r.usage.prompt_tokens == len(prompt_ids)
    stream = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == r.choices[0].message.content
    assert stream[-1].usage.completion_tokens == r.usage.completion_tokens


def test_seeded_sampling_reproducible(client):
    kw = dict(
        model=MODEL_NAME,
        prompt=PROMPTS[0],
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
        extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c


def test_concurrent_requests_are_batched(server, client):
    kw = dict(model=MODEL_NAME, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    solo = [client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(
            pool.map(lambda p: client.completions.create(prompt=p, **kw).choices[0].text, PROMPTS)
        )
    assert together == solo
    assert metric(server, "mathforge_requests_running_peak") >= 2
    wait_idle(server)


def test_stop_strings(client):
    kw = dict(
        model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = client.completions.create(**kw).choices[0].text
    stop = text[6:9]
    r = client.completions.create(stop=["@@never@@", stop], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.find(stop)]
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw) if c.choices
    )
    assert streamed == text[: text.find(stop)]


def test_streaming_client_disconnect_frees_slot(server):
    aborted = metric(server, "mathforge_requests_finished_total", 'finish_reason="abort"')
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", server + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert metric(server, "mathforge_requests_running") == 1
    # the connection is closed here, mid-stream
    assert wait_idle(server, timeout=2.0) < 2.0
    assert metric(server, "mathforge_requests_finished_total", 'finish_reason="abort"') == aborted + 1


def test_non_streaming_client_disconnect_frees_slot(server):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.4))
    assert wait_idle(server, timeout=2.0) < 2.0


LONG_PROMPT = list(range(10, 10 + MAX_MODEL_LEN + 5))

BAD_REQUESTS = {
    "malformed json": ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi"', None),
    "lone surrogate in prompt": (
        "/v1/completions",
        b'{"model": "tiny-test", "prompt": "\\ud800 hi"}',
        "prompt",
    ),
    "json array body": ("/v1/completions", [1, 2, 3], None),
    "empty body": ("/v1/completions", b"", None),
    "prompt missing": ("/v1/completions", {"model": MODEL_NAME}, "prompt"),
    "prompt wrong type": ("/v1/completions", {"model": MODEL_NAME, "prompt": 5}, "prompt"),
    "max_tokens string": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "max_tokens": "5"},
        "max_tokens",
    ),
    "max_tokens float": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2.5},
        "max_tokens",
    ),
    "max_tokens negative": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "max_tokens": -1},
        "max_tokens",
    ),
    "max_tokens zero": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0},
        "max_tokens",
    ),
    "max_tokens huge": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 10**15},
        "max_tokens",
    ),
    "prompt too long": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": 1},
        "prompt",
    ),
    "token id out of range": ("/v1/completions", {"model": MODEL_NAME, "prompt": [1, 10**9]}, "prompt"),
    "unknown model": ("/v1/completions", {"model": "gpt-7", "prompt": "hi"}, "model"),
    "temperature string": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "temperature": "hot"},
        "temperature",
    ),
    "temperature negative": (
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "hi", "temperature": -1},
        "temperature",
    ),
    "top_p out of range": ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "top_p": 1.5}, "top_p"),
    "stop wrong type": ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "stop": 3}, "stop"),
    "n > 1": ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 2}, "n"),
    "stream not bool": ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "stream": "yes"}, "stream"),
    "chat unknown model": (
        "/v1/chat/completions",
        {"model": "gpt-7", "messages": [{"role": "user", "content": "x"}]},
        "model",
    ),
    "chat messages wrong type": (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": "hello"},
        "messages",
    ),
    "chat messages empty": ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, "messages"),
    "chat max_tokens huge": (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "max_tokens": 10**6, "messages": [{"role": "user", "content": "x"}]},
        "max_tokens",
    ),
    "chat prompt too long": (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "7 " * 1200}]},
        "messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_400(server, case):
    path, body, param = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        r = httpx.post(server + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_openai_client_sees_400(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert exc.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=10**9)


def test_server_keeps_serving_after_bad_input(server, client):
    for body in (b"{", b"[]", json.dumps({"prompt": [10**9]}).encode()):
        httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert httpx.get(server + "/health").status_code == 200
    r = client.completions.create(model=MODEL_NAME, prompt="2+2=", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert metric(server, "mathforge_engine_step_errors_total") == 0
    assert metric(server, "mathforge_http_errors_total", 'status="400"') >= len(BAD_REQUESTS)


def test_metrics_exposition(server):
    r = httpx.get(server + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "mathforge_requests_running",
        "mathforge_requests_waiting",
        "mathforge_slots_free",
        "mathforge_slots_total",
        "mathforge_prompt_tokens_total",
        "mathforge_generation_tokens_total",
        "mathforge_requests_finished_total",
        "mathforge_time_to_first_token_seconds",
    ):
        assert f"# TYPE {name} " in text
    assert metric(server, "mathforge_slots_total") == 4
    assert metric(server, "mathforge_generation_tokens_total") > 0
    count = next(
        line for line in text.splitlines() if line.startswith("mathforge_time_to_first_token_seconds_count")
    )
    assert float(count.split()[-1]) > 0
