"""The client-side benchmark: metric arithmetic offline, then a real sweep against `mathforge serve`."""

from __future__ import annotations

import json

import pytest
from _serve import MODEL_NAME, start_server

from mathforge.bench.client import RequestRecord, completions_url
from mathforge.bench.run import percentile, run_benchmark_sync, summarize
from mathforge.cli import main

LATENCY = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
PROMPTS = ["Solve: 2+3.", "Compute 12*12.", "Find x if 2x = 10."]


def test_percentile_is_numpy_linear():
    assert percentile([], 50) == 0.0
    assert percentile([5.0], 99) == 5.0
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(7.6)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 10.0


def test_summarize_metrics():
    recs = [
        RequestRecord(
            index=0, ok=True, ttft_s=0.1, e2e_s=1.1, itl_s=[0.1] * 10, output_tokens=11, prompt_tokens=5
        ),
        RequestRecord(
            index=1,
            ok=True,
            ttft_s=0.3,
            e2e_s=2.3,
            itl_s=[0.2] * 10,
            output_tokens=11,
            prompt_tokens=5,
            accept_len_mean=2.5,
        ),
        RequestRecord(index=2, ok=False, error="HTTP 500: boom"),
    ]
    m = summarize(recs, duration_s=2.5)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["ttft_ms_mean"] == pytest.approx(200.0) and m["ttft_ms_p50"] == pytest.approx(200.0)
    assert m["tpot_ms_mean"] == pytest.approx(150.0)  # (1000/10 + 2000/10) / 2
    assert m["itl_ms_p50"] == pytest.approx(150.0)
    assert m["e2e_ms_p99"] == pytest.approx(1100 + 0.99 * 1200)
    assert m["output_tok_s"] == pytest.approx(22 / 2.5) and m["total_tok_s"] == pytest.approx(32 / 2.5)
    assert m["request_s"] == pytest.approx(0.8)
    assert m["accept_len_mean"] == 2.5
    assert "accept_len_mean" not in summarize(recs[:1], 1.0)


def test_completions_url():
    for base in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert completions_url(base) == "http://h:1/v1/completions"


def test_unreachable_server_counts_failures():
    res = run_benchmark_sync(
        "http://127.0.0.1:9",
        "m",
        PROMPTS,
        concurrency_levels=[2],
        num_prompts=3,
        max_tokens=4,
        warmup=0,
        timeout=5,
    )
    m = res["levels"][0]["metrics"]
    assert m["completed"] == 0 and m["failed"] == 3
    assert all(r["error"] for r in res["levels"][0]["requests"])


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, url = start_server(tiny_model_dir, "--max-slots", "4", "--max-model-len", "512")
    try:
        yield url
    finally:
        proc.stop()


def test_benchmark_against_live_server(server):
    calls = []
    res = run_benchmark_sync(
        server + "/v1",
        MODEL_NAME,
        PROMPTS,
        concurrency_levels=[1, 3],
        num_prompts=6,
        max_tokens=12,
        warmup=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (12, 12)
    md = res["metadata"]
    assert md["model"] == MODEL_NAME and md["base_url"] == server + "/v1" and md["timestamp"]
    assert md["client"]["hostname"] and md["server"]["id"] == MODEL_NAME
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 3]
    for lv in res["levels"]:
        m = lv["metrics"]
        assert m["completed"] == 6 and m["failed"] == 0
        assert len(lv["requests"]) == 6  # warm-up requests are not recorded
        for key in LATENCY:
            vals = [m[f"{key}_{s}"] for s in ("mean", "p50", "p90", "p99")]
            assert all(v > 0 for v in vals), key
            assert m[f"{key}_p50"] <= m[f"{key}_p90"] <= m[f"{key}_p99"], key
        for key in ("output_tok_s", "total_tok_s", "request_s"):
            assert m[key] > 0
        assert m["total_output_tokens"] == 6 * 12  # ignore_eos honoured: equal output lengths
        assert m["e2e_ms_p50"] >= m["ttft_ms_p50"]
        assert "accept_len_mean" not in m  # no drafter
        for r in lv["requests"]:
            assert r["ok"] and r["output_tokens"] == 12 and len(r["itl_s"]) >= 1 and r["tpot_s"] > 0
    json.dumps(res)  # serializable


def test_bench_cli(server, tmp_path, capsys):
    out = tmp_path / "results.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    rc = main(
        [
            "bench",
            "--base-url",
            server,
            "--model",
            MODEL_NAME,
            "--num-prompts",
            "3",
            "--concurrency",
            "1,2",
            "--max-tokens",
            "6",
            "--warmup",
            "0",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert [lv["metrics"]["completed"] for lv in res["levels"]] == [3, 3]
    assert "TTFT" in capsys.readouterr().out
