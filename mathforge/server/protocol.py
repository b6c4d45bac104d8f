"""OpenAI-compatible request/response shapes for `/v1/completions` and `/v1/chat/completions`.

Requests are validated strictly (a string where a number belongs is an error, not coerced) and unknown
fields are ignored, as OpenAI-compatible servers do. vLLM/TensorRT-LLM extras are accepted: `top_k`,
`min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mathforge.engine.api import SamplingParams

_STRICT = ConfigDict(strict=True, extra="ignore")


class ProtocolError(ValueError):
    """A request the server refuses: becomes HTTP `status` with an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=1e4)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=1e4)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise ProtocolError(
                f"n={self.n} is not supported: this server returns one choice per request "
                f"(send n separate requests)",
                param="n",
            )
        if self.logprobs not in (None, False, 0):
            raise ProtocolError("logprobs are not supported by this server", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ProtocolError(f"{name} is not supported; use repetition_penalty", param=name)
        if self.logit_bias:
            raise ProtocolError("logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError(
                "stream_options is only allowed together with stream=true", param="stream_options"
            )
        stops = self.stop_list()
        if any(not s for s in stops):
            raise ProtocolError("stop strings must be non-empty", param="stop")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise ProtocolError("echo is not supported by this server", param="echo")
        if self.best_of not in (None, 1):
            raise ProtocolError("best_of is not supported by this server", param="best_of")
        if self.suffix:
            raise ProtocolError("suffix is not supported by this server", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (a batch of several prompts is refused)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise ProtocolError("prompt is empty", param="prompt")
        if isinstance(p[0], int):
            return p  # type: ignore[return-value]
        if len(p) != 1:
            raise ProtocolError(
                f"a list of {len(p)} prompts is not supported: send one prompt per request", param="prompt"
            )
        return p[0]  # type: ignore[return-value]


class ContentPart(BaseModel):
    model_config = _STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, name, ... go to the template
    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict:
        d = self.model_dump(exclude_none=True)
        c = self.content
        if isinstance(c, list):
            if any(p.type != "text" for p in c):
                raise ProtocolError("only text content parts are supported", param="messages")
            d["content"] = "".join(p.text or "" for p in c)
        elif c is None:
            d["content"] = ""
        return d


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, accept_lens: list[int] | None = None) -> dict:
    u: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if accept_lens:
        u["accept_len_mean"] = sum(accept_lens) / len(accept_lens)
    return u


def completion_response(
    rid: str, model: str, created: int, text: str, finish_reason: str | None, usage_: dict
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_,
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_response(
    rid: str, model: str, created: int, text: str, finish_reason: str | None, usage_: dict
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(
    rid: str, model: str, created: int, obj: Literal["text_completion", "chat.completion.chunk"], usage_: dict
) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def now() -> int:
    return int(time.time())
