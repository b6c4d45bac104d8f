"""One streamed `/v1/completions` request, timed on the client side (as `vllm bench serve` does).

Works against any OpenAI-compatible server: only HTTP and SSE. Per request it records

- TTFT: from sending the request to the first chunk carrying text;
- ITL: every gap between consecutive text-carrying chunks (a chunk that bundles several tokens shows
  up as one longer gap, as in vLLM's benchmark);
- E2E: from sending to the end of the stream;
- output tokens: `usage.completion_tokens` when the server reports it (we ask with
  `stream_options.include_usage`), else the number of text-carrying chunks;
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token;
- the speculative acceptance length when the server reports one (`usage.accept_len_mean`, or
  TensorRT-LLM's per-choice `avg_decoded_tokens_per_iter`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class RequestRecord:
    index: int
    ok: bool = False
    error: str | None = None
    start_s: float = 0.0  # send time relative to the level's start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    chunks: int = 0
    finish_reason: str | None = None
    accept_len_mean: float | None = None
    output_chars: int = 0

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens <= 1 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d


def completions_url(base_url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` -> `.../v1/completions`."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/completions"


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    extra_body: dict[str, Any] | None = None,
    index: int = 0,
    t0: float | None = None,
) -> RequestRecord:
    """Send one streamed completion and time it; never raises for a failed request (ok=False)."""
    rec = RequestRecord(index=index)
    payload: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM / TensorRT-LLM / mathforge extension: comparable output lengths
    payload.update(extra_body or {})
    start = time.perf_counter()
    rec.start_s = start - (t0 if t0 is not None else start)
    last = start
    text_chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {_error_message(body)}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    rec.error = f"malformed SSE data: {data[:200]}"
                    return rec
                if "error" in chunk:
                    rec.error = f"server error in stream: {_error_message(json.dumps(chunk))}"
                    return rec
                rec.chunks += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("index", 0) != 0:
                        continue
                    text = choice.get("text") or ""
                    if text:
                        text_chunks += 1
                        rec.output_chars += len(text)
                        if rec.ttft_s is None:
                            rec.ttft_s = now - start
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                    if choice.get("avg_decoded_tokens_per_iter") is not None:
                        rec.accept_len_mean = float(choice["avg_decoded_tokens_per_iter"])
    except (httpx.HTTPError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    rec.e2e_s = time.perf_counter() - start
    if usage and isinstance(usage.get("completion_tokens"), int):
        rec.output_tokens = usage["completion_tokens"]
        rec.output_tokens_from_usage = True
        rec.prompt_tokens = usage.get("prompt_tokens")
        if usage.get("accept_len_mean") is not None:
            rec.accept_len_mean = float(usage["accept_len_mean"])
    else:
        rec.output_tokens = text_chunks
    if rec.ttft_s is None:
        rec.error = "the stream carried no text"
        return rec
    rec.ok = True
    return rec


def _error_message(body: str) -> str:
    try:
        obj = json.loads(body)
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    except (json.JSONDecodeError, AttributeError):
        return body[:500]
