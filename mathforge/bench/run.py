"""The client-side serving benchmark: a concurrency sweep over any OpenAI-compatible server.

For each concurrency level c: `warmup` requests (not measured), then `num_prompts` streamed requests
with at most c in flight. Per level the metrics are those of `vllm bench serve`:
`ttft_ms_*`, `tpot_ms_*`, `itl_ms_*`, `e2e_ms_*` (mean, p50, p90, p99; linear-interpolated
percentiles like numpy's default), `request_s`, `output_tok_s`, `total_tok_s` (over the level's
wall time, first send to last byte), `completed`, `failed`, and `accept_len_mean` when the server
reports speculative acceptance. Prompts are used in order, cycling; every level sends the same ones.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from mathforge.bench.client import RequestRecord, completions_url, stream_completion

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")

ProgressArg = Callable[[int, int], Any] | Any | bool | None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        return 0.0
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _describe(prefix: str, values_s: Sequence[float], out: dict[str, float]) -> None:
    ms = [v * 1000.0 for v in values_s]
    out[f"{prefix}_mean"] = statistics.fmean(ms) if ms else 0.0
    for q in PERCENTILES:
        out[f"{prefix}_p{q}"] = percentile(ms, q)


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict[str, float]:
    """The metrics of one level from its (measured) records; latency stats are 0.0 when nothing completed."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    dur = max(duration_s, 1e-9)
    m: dict[str, float] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_s": len(ok) / dur,
        "output_tok_s": out_tokens / dur,
        "total_tok_s": (in_tokens + out_tokens) / dur,
    }
    _describe("ttft_ms", [r.ttft_s for r in ok if r.ttft_s is not None], m)
    _describe("tpot_ms", [t for r in ok if (t := r.tpot_s) is not None], m)
    _describe("itl_ms", [x for r in ok for x in r.itl_s], m)
    _describe("e2e_ms", [r.e2e_s for r in ok if r.e2e_s is not None], m)
    accept = [r.accept_len_mean for r in ok if r.accept_len_mean is not None]
    if accept:
        m["accept_len_mean"] = statistics.fmean(accept)
    return m


class _Progress:
    """Adapts the `progress` argument: None/False (silent), True (a rich bar), a rich Progress, or a
    `callback(done, total)`."""

    def __init__(self, progress: ProgressArg, total: int):
        self.total, self.done = total, 0
        self._own = None
        self._rich = None
        self._task = None
        self._callback: Callable[[int, int], Any] | None = None
        if progress is True:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._own = self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._own.start()
        elif progress is not None and progress is not False and hasattr(progress, "add_task"):
            self._rich = progress
        elif callable(progress):
            self._callback = progress
        if self._rich is not None:
            self._task = self._rich.add_task("benchmark", total=total)

    def level(self, concurrency: int) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=f"benchmark c={concurrency}")

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._own is not None:
            self._own.stop()


def client_info() -> dict[str, Any]:
    import mathforge

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "mathforge": mathforge.__version__,
        "httpx": httpx.__version__,
    }


async def _server_info(client: httpx.AsyncClient, base_url: str, model: str) -> dict[str, Any] | None:
    """The server's /v1/models entry for `model` (best effort)."""
    try:
        r = await client.get(completions_url(base_url).rsplit("/", 1)[0] + "/models", timeout=10.0)
        if r.status_code == 200:
            for entry in r.json().get("data", []):
                if entry.get("id") == model:
                    return entry
    except Exception:
        pass
    return None


async def _run_level(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompts: Sequence[str],
    n: int,
    concurrency: int,
    common: dict[str, Any],
    on_done: Callable[[], None] | None,
) -> tuple[list[RequestRecord], float]:
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    ends: list[float] = []

    async def one(i: int) -> RequestRecord:
        async with sem:
            rec = await stream_completion(
                client, url, model, prompts[i % len(prompts)], index=i, t0=t0, **common
            )
            ends.append(time.perf_counter())
        if on_done is not None:
            on_done()
        return rec

    records = await asyncio.gather(*(one(i) for i in range(n)))
    duration = (max(ends) if ends else time.perf_counter()) - t0
    return list(records), duration


async def run_benchmark(
    base_url: str,
    model: str,
    prompts: Sequence[str],
    *,
    concurrency_levels: Sequence[int] = (1,),
    num_prompts: int = 16,
    max_tokens: int = 128,
    warmup: int = 2,
    temperature: float = 0.0,
    progress: ProgressArg = None,
    ignore_eos: bool = True,
    api_key: str | None = None,
    timeout: float = 600.0,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the sweep; returns {"metadata": {...}, "levels": [{"concurrency", "metrics", "requests"}]}."""
    if not prompts:
        raise ValueError("prompts is empty")
    levels = [int(c) for c in concurrency_levels]
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"concurrency levels must be positive integers, got {list(concurrency_levels)}")
    if num_prompts < 1 or max_tokens < 1 or warmup < 0:
        raise ValueError("num_prompts and max_tokens must be >= 1 and warmup >= 0")
    url = completions_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    common = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": ignore_eos,
        "extra_body": extra_body,
    }
    started = datetime.now(UTC)
    prog = _Progress(progress, len(levels) * num_prompts)
    out_levels: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=30.0), limits=limits, headers=headers
        ) as client:
            server = await _server_info(client, base_url, model)
            for c in levels:
                prog.level(c)
                if warmup:
                    await _run_level(client, url, model, prompts, warmup, min(c, warmup), common, None)
                records, duration = await _run_level(
                    client, url, model, prompts, num_prompts, c, common, prog.advance
                )
                out_levels.append(
                    {
                        "concurrency": c,
                        "metrics": summarize(records, duration),
                        "requests": [r.to_dict() for r in records],
                    }
                )
    finally:
        prog.close()
    return {
        "metadata": {
            "base_url": base_url,
            "model": model,
            "timestamp": started.isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "endpoint": url,
            "num_prompts": num_prompts,
            "distinct_prompts": len(prompts),
            "concurrency_levels": levels,
            "max_tokens": max_tokens,
            "warmup": warmup,
            "temperature": temperature,
            "ignore_eos": ignore_eos,
            "client": client_info(),
            "server": server,
        },
        "levels": out_levels,
    }


def run_benchmark_sync(base_url: str, model: str, prompts: Sequence[str], **kwargs) -> dict[str, Any]:
    """`run_benchmark` from synchronous code (also from a thread whose own event loop is running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_benchmark(base_url, model, prompts, **kwargs))
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run_benchmark(base_url, model, prompts, **kwargs)).result()
