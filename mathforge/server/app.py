"""The OpenAI-compatible HTTP server of the torch backend (FastAPI).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming), GET /v1/models,
GET /health, GET /metrics (Prometheus text).

Robustness rules: every bad request gets HTTP 400 with an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}` (FastAPI's 422 is mapped to 400 too) and never
reaches the engine thread; a client that disconnects — streamed or not — has its request aborted and
its KV-cache slot freed at once (a watcher awaits the ASGI `http.disconnect` message).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mathforge.engine.api import EngineInputError, RequestOutput, SamplingParams
from mathforge.engine.async_engine import AsyncEngine
from mathforge.server import protocol as P
from mathforge.server.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("mathforge.server")

# default max_tokens of /v1/completions when the client sends none (OpenAI's default)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class _State:
    def __init__(self, engine: AsyncEngine, tokenizer, served_model_name: str, model_dir: str | None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = served_model_name
        self.model_dir = model_dir
        self.metrics = ServerMetrics()
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len


def create_app(
    engine: AsyncEngine,
    tokenizer,
    *,
    served_model_name: str,
    model_dir: str | None = None,
    manage_engine: bool = True,
) -> FastAPI:
    """Build the app around an AsyncEngine. With manage_engine, the app's lifespan starts the engine
    thread and shuts it down; `tokenizer` should not be the engine's own instance (it is used from the
    event loop while the engine thread detokenizes)."""
    state = _State(engine, tokenizer, served_model_name, model_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="mathforge", version="0.1.0", lifespan=lifespan)
    app.state.mf = state

    # ------------------------------------------------------------------ errors
    def error(
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> JSONResponse:
        state.metrics.http_errors[status] += 1
        return JSONResponse(P.error_body(message, type=type, param=param, code=code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return error(
                400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json"
            )
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # drop union-branch names pydantic adds ("str", "list[int]", ...) from the parameter path
        param = ".".join(
            x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")
        )
        msg = first.get("msg", "invalid request")
        if first.get("type") == "missing" and not loc:
            msg = "the request body is missing"
        elif first.get("type") == "model_attributes_type":
            msg = "the request body must be a JSON object"
        text = f"{param}: {msg}" if param else msg
        if len(errs) > 1:
            text += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return error(400, text, param=param or None, code="invalid_value")

    @app.exception_handler(P.ProtocolError)
    async def _protocol(request: Request, exc: P.ProtocolError):
        return error(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(EngineInputError)
    async def _engine_input(request: Request, exc: EngineInputError):
        return error(400, str(exc), param=_guess_param(str(exc)), code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error serving %s", request.url.path)
        return error(500, f"internal server error: {type(exc).__name__}: {exc}", type="internal_error")

    # ------------------------------------------------------------------ helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise P.ProtocolError(
                f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def resolve(
        prompt_ids: list[int],
        req: P._SamplingFields,
        requested: int | None,
        default: int | None,
        prompt_param: str,
    ) -> SamplingParams:
        """max_tokens + context checks with precise `param`s, then the engine's own validation."""
        n, ctx = len(prompt_ids), state.max_model_len
        if n == 0:
            raise P.ProtocolError("the prompt is empty", param=prompt_param)
        if n >= ctx:
            raise P.ProtocolError(
                f"the prompt has {n} tokens, but this model's maximum context length is {ctx} tokens "
                f"(prompt plus at least one output token); shorten the prompt",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            max_tokens = ctx - n if default is None else min(default, ctx - n)
        else:
            if requested < 1:
                raise P.ProtocolError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
            if n + requested > ctx:
                raise P.ProtocolError(
                    f"this model's maximum context length is {ctx} tokens, but {n + requested} were requested "
                    f"({n} in the prompt, {requested} in max_tokens); reduce max_tokens to at most {ctx - n}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = requested
        params = req.sampling_params(max_tokens)
        state.engine.validate(prompt_ids, params)
        return params

    async def watch_disconnect(request: Request, request_id: str) -> None:
        """Abort the request as soon as the client goes away."""
        try:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    state.engine.abort(request_id)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a server without a receive channel here: rely on send failures
            return

    def observe(start: float, first: float | None) -> None:
        if first is not None:
            state.metrics.ttft.observe(first - start)
        state.metrics.e2e.observe(time.perf_counter() - start)

    async def collect(
        request: Request, prompt_ids: list[int], params: SamplingParams, rid: str, start: float
    ) -> tuple[str, RequestOutput, list[int]]:
        gen = state.engine.generate(prompt_ids, params, rid)
        watcher = asyncio.create_task(watch_disconnect(request, rid))
        parts: list[str] = []
        accept: list[int] = []
        last: RequestOutput | None = None
        first: float | None = None
        try:
            async for out in gen:
                if first is None and out.token_ids:
                    first = time.perf_counter()
                parts.append(out.text)
                accept += out.accept_lens
                last = out
        finally:
            watcher.cancel()
            await gen.aclose()
        observe(start, first)
        assert last is not None
        return "".join(parts), last, accept

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def stream(
        request: Request,
        prompt_ids: list[int],
        params: SamplingParams,
        rid: str,
        start: float,
        chunk,
        include_usage: bool,
        usage_object: str,
        first_delta: str | None,
    ) -> AsyncIterator[str]:
        """SSE events; `chunk(text, finish_reason)` builds one event's payload."""
        gen = state.engine.generate(prompt_ids, params, rid)
        watcher = asyncio.create_task(watch_disconnect(request, rid))
        first: float | None = None
        last: RequestOutput | None = None
        accept: list[int] = []
        try:
            if first_delta is not None:
                yield sse(chunk(None, None))
            async for out in gen:
                last = out
                accept += out.accept_lens
                if first is None and out.token_ids:
                    first = time.perf_counter()
                if out.finish_reason == "abort":
                    return
                if out.text or out.finished:
                    yield sse(chunk(out.text, out.finish_reason))
            if include_usage and last is not None:
                yield sse(
                    P.usage_chunk(
                        rid,
                        state.model_name,
                        P.now(),
                        usage_object,  # type: ignore[arg-type]
                        P.usage(last.prompt_tokens, last.completion_tokens, accept),
                    )
                )
            yield "data: [DONE]\n\n"
        except EngineInputError as exc:
            yield sse(P.error_body(str(exc), param=_guess_param(str(exc))))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # engine failure mid-stream: tell the client in-band
            log.exception("stream %s failed", rid)
            yield sse(P.error_body(f"internal server error: {exc}", type="internal_error"))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            await gen.aclose()
            observe(start, first)

    def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def encode(text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return list(state.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except Exception as exc:  # e.g. lone surrogates the tokenizer cannot take
            raise P.ProtocolError(f"the {param} could not be tokenized: {exc}", param=param) from None

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not state.engine.is_running:
            return JSONResponse(
                {"status": "error", "detail": "engine thread is not running"}, status_code=503
            )
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "mathforge",
                    "root": state.model_dir or state.model_name,
                    "max_model_len": state.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(state.engine.stats(), state.model_name), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats():
        return state.engine.stats()

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        start = time.perf_counter()
        state.metrics.requests_started["completions"] += 1
        check_model(body.model)
        body.check_unsupported()
        prompt = body.single_prompt()
        prompt_ids = encode(prompt, True, "prompt") if isinstance(prompt, str) else list(prompt)
        params = resolve(prompt_ids, body, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        rid, created, name = P.new_id("cmpl"), P.now(), state.model_name
        if body.stream:

            def chunk(text, finish):
                return P.completion_chunk(rid, name, created, text or "", finish)

            return sse_response(
                stream(
                    request,
                    prompt_ids,
                    params,
                    rid,
                    start,
                    chunk,
                    body.include_usage,
                    "text_completion",
                    None,
                )
            )
        text, last, accept = await collect(request, prompt_ids, params, rid, start)
        return P.completion_response(
            rid,
            name,
            created,
            text,
            last.finish_reason,
            P.usage(last.prompt_tokens, last.completion_tokens, accept),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        start = time.perf_counter()
        state.metrics.requests_started["chat_completions"] += 1
        check_model(body.model)
        body.check_unsupported()
        if not getattr(state.tokenizer, "chat_template", None):
            raise P.ProtocolError("this model has no chat template; use /v1/completions", param="messages")
        messages = [m.for_template() for m in body.messages]
        try:
            kwargs = dict(body.chat_template_kwargs or {})
            if body.tools:
                kwargs["tools"] = body.tools
            text = state.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, tokenize=False, **kwargs
            )
        except Exception as exc:  # jinja errors (raise_exception in the template, bad kwargs)
            raise P.ProtocolError(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from None
        prompt_ids = encode(text, False, "messages")
        params = resolve(prompt_ids, body, body.requested_max_tokens, None, "messages")
        rid, created, name = P.new_id("chatcmpl"), P.now(), state.model_name
        if body.stream:

            def chunk(text, finish):
                if text is None and finish is None:
                    delta = {"role": "assistant", "content": ""}
                else:
                    delta = {"content": text} if text else {}
                return P.chat_chunk(rid, name, created, delta, finish)

            return sse_response(
                stream(
                    request,
                    prompt_ids,
                    params,
                    rid,
                    start,
                    chunk,
                    body.include_usage,
                    "chat.completion.chunk",
                    "role",
                )
            )
        text, last, accept = await collect(request, prompt_ids, params, rid, start)
        return P.chat_response(
            rid,
            name,
            created,
            text,
            last.finish_reason,
            P.usage(last.prompt_tokens, last.completion_tokens, accept),
        )

    return app


def _guess_param(message: str) -> str | None:
    for name in (
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop_token_ids",
        "stop",
        "prompt",
    ):
        if name in message:
            return name
    return None
