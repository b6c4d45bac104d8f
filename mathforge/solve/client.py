"""Streaming client for any OpenAI-compatible `/v1/completions` endpoint (ours, trtllm-serve, vLLM, SGLang).

Only standard OpenAI fields are sent (`model`, `prompt`, `max_tokens`, `temperature`, `top_p`, `seed`,
`stop`, `stream`, `stream_options`); the common extensions `top_k`, `min_p` and `repetition_penalty` are
added only when set, so servers that reject unknown fields are not bothered.

    async with CompletionsClient(base_url, model) as client:
        async with client.stream(prompt, max_tokens=512, stop=["</tool_call>"]) as stream:
            async for chunk in stream:          # CompletionChunk: text, finish_reason
                ...
        stream.text, stream.finish_reason, stream.completion_tokens

Leaving the `async with client.stream(...)` block early (break, exception, task cancellation) closes the
HTTP response and its connection, which is how the server learns to stop generating and free the slot.
Token counts come from `usage` (requested with `stream_options.include_usage`); a server that sends no
usage gets NeMo-Skills' fallback of one token per streamed chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx


class CompletionError(RuntimeError):
    """The server refused or broke a request (HTTP error status, error event, malformed stream)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass
class CompletionChunk:
    text: str
    finish_reason: str | None = None


@dataclass
class CompletionStream:
    """One streamed completion: iterate it for chunks; totals are filled in as it goes."""

    _lines: AsyncIterator[str] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM `stop_reason` / SGLang `matched_stop`: the stop string hit
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    num_chunks: int = 0

    @property
    def num_generated_tokens(self) -> int:
        """Tokens generated: from `usage`, else one per non-empty chunk (NeMo-Skills' streaming estimate)."""
        return self.completion_tokens if self.completion_tokens is not None else self.num_chunks

    def __aiter__(self) -> AsyncIterator[CompletionChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[CompletionChunk]:
        assert self._lines is not None, "stream not opened"
        async for line in self._lines:
            line = line.strip()
            if not line or line.startswith(":") or not line.startswith("data:"):
                continue  # SSE comments / keep-alives / event names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except json.JSONDecodeError as exc:
                raise CompletionError(f"malformed stream event: {data[:200]!r}") from exc
            if "error" in event and not event.get("choices"):
                err = event["error"]
                msg = err.get("message", err) if isinstance(err, dict) else err
                raise CompletionError(f"server error during generation: {msg}")
            usage = event.get("usage")
            if usage:
                self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
                self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
            for choice in event.get("choices") or []:
                text = choice.get("text") or ""
                reason = choice.get("finish_reason")
                if reason:
                    self.finish_reason = reason
                    stop_reason = choice.get("stop_reason", choice.get("matched_stop"))
                    if stop_reason is not None:
                        self.stop_reason = stop_reason
                if text:
                    self.num_chunks += 1
                    self.text += text
                if text or reason:
                    yield CompletionChunk(text=text, finish_reason=reason)


def completions_url(base_url: str) -> str:
    """`http://h:p`, `http://h:p/v1` or the full endpoint URL -> `http://h:p/v1/completions`."""
    url = base_url.rstrip("/")
    if url.endswith("/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/completions"


class CompletionsClient:
    """A pooled async HTTP client for one OpenAI-compatible server and model."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_connections: int = 512,
        connect_timeout: float = 10.0,
        read_timeout: float | None = 600.0,
    ) -> None:
        self.url = completions_url(base_url)
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(connect_timeout, read=read_timeout, write=30.0, pool=None),
        )

    async def __aenter__(self) -> CompletionsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.aclose()

    def request_body(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        extra_body: dict | None = None,
    ) -> dict:
        body: dict = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if seed is not None:
            body["seed"] = int(seed)
        if stop:
            body["stop"] = list(stop)
        if top_k is not None and top_k > 0:
            body["top_k"] = int(top_k)
        if min_p is not None and min_p > 0:
            body["min_p"] = float(min_p)
        if repetition_penalty is not None and repetition_penalty != 1.0:
            body["repetition_penalty"] = float(repetition_penalty)
        body.update(extra_body or {})
        return body

    @asynccontextmanager
    async def stream(self, prompt: str, **params) -> AsyncIterator[CompletionStream]:
        """Open a streamed completion (`params` as for `request_body`); closing the block cancels it."""
        body = self.request_body(prompt, **params)
        async with self._client.stream("POST", self.url, json=body) as resp:
            if resp.status_code >= 400:
                raw = (await resp.aread()).decode(errors="replace")
                try:
                    err = json.loads(raw).get("error", raw)
                    msg = err.get("message", err) if isinstance(err, dict) else err
                except (ValueError, AttributeError):
                    msg = raw
                raise CompletionError(
                    f"{self.url} answered HTTP {resp.status_code}: {str(msg)[:500]}",
                    status_code=resp.status_code,
                )
            yield CompletionStream(_lines=resp.aiter_lines())

    async def complete(self, prompt: str, **params) -> CompletionStream:
        """The whole completion at once (still streamed underneath)."""
        async with self.stream(prompt, **params) as s:
            async for _ in s:
                pass
        return s
