"""A scripted OpenAI-compatible completions server for testing the solve loop (not a model).

Run: `python tests/scripted_openai_server.py --port P`. Scripts are set over HTTP (`PUT /script`):

    {"scripts": {"NAME": {"turns": ["text of turn 0", "text of turn 1", ...],
                          "delay": 0.0,             # seconds between streamed tokens
                          "usage": true,            # send a usage chunk when the client asks for one
                          "stop_reason": false,     # add vLLM's `stop_reason` to the final choice
                          "by_seed": {"3": [...]}}}} # per-seed turns overriding `turns`

A prompt selects its script with the marker `[[script:NAME]]`; the turn is the number of code outputs
("```output") already in the prompt after the marker, so each continuation after a code execution gets
the next turn's text. The server honours `stop` (the stop string is not echoed, finish_reason "stop"),
`max_tokens` (finish_reason "length"), streams one token per SSE event, and counts tokens as `\\S+\\s*`
pieces, plus one for the stop string / end of sequence when it stops. It records every request
(`GET /requests`), and counts active, finished and cancelled (client disconnected) streams (`GET /stats`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TOKEN_RE = re.compile(r"\S+\s*|\s+")
MARKER_RE = re.compile(r"\[\[script:([\w.-]+)\]\]")

app = FastAPI()
STATE: dict = {"scripts": {}, "requests": [], "active": 0, "finished": 0, "cancelled": 0}


def plan(body: dict) -> tuple[list[str], str, int, dict]:
    """The tokens to stream, the finish reason, completion_tokens, and the script used."""
    prompt = body.get("prompt", "")
    markers = list(MARKER_RE.finditer(prompt))
    match = markers[-1] if markers else None
    script = STATE["scripts"].get(match.group(1), {}) if match else {}
    turns = script.get("turns", [])
    seed = body.get("seed")
    if seed is not None and str(seed) in script.get("by_seed", {}):
        turns = script["by_seed"][str(seed)]
    after = prompt[match.end() :] if match else prompt
    turn = after.count("```output")
    text = turns[turn] if turn < len(turns) else ""
    stops = body.get("stop") or []
    if isinstance(stops, str):
        stops = [stops]
    cut = None
    for s in stops:
        pos = text.find(s)
        if pos >= 0 and (cut is None or pos < cut[0]):
            cut = (pos, s)
    if cut is not None:
        text = text[: cut[0]]
    tokens = TOKEN_RE.findall(text)
    max_tokens = int(body.get("max_tokens", 16))
    if len(tokens) > max_tokens:
        return tokens[:max_tokens], "length", max_tokens, {**script, "_stop": None}
    return tokens, "stop", len(tokens) + 1, {**script, "_stop": cut[1] if cut else None}


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.put("/script")
async def set_script(request: Request) -> dict:
    STATE["scripts"] = (await request.json())["scripts"]
    return {"ok": True}


@app.get("/requests")
async def requests() -> list:
    return STATE["requests"]


@app.get("/stats")
async def stats() -> dict:
    return {k: STATE[k] for k in ("active", "finished", "cancelled")}


@app.post("/reset")
async def reset() -> dict:
    STATE.update(requests=[], active=0, finished=0, cancelled=0)
    return {"ok": True}


@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    STATE["requests"].append(body)
    if not isinstance(body.get("prompt"), str) or int(body.get("max_tokens", 16)) < 1:
        return JSONResponse(
            {"error": {"message": "prompt must be a string and max_tokens >= 1", "type": "BadRequestError"}},
            status_code=400,
        )
    tokens, finish, n_completion, script = plan(body)
    rid = f"cmpl-{uuid.uuid4().hex[:12]}"
    delay = float(script.get("delay", 0.0))
    want_usage = bool((body.get("stream_options") or {}).get("include_usage")) and script.get("usage", True)

    def event(text: str, reason: str | None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        if reason is not None and script.get("stop_reason"):
            choice["stop_reason"] = script.get("_stop")
        payload = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
        }
        return "data: " + json.dumps({**payload, "choices": [choice]}) + "\n\n"

    async def stream():
        STATE["active"] += 1
        done = False
        try:
            for tok in tokens:
                if delay:
                    await asyncio.sleep(delay)
                yield event(tok, None)
            yield event("", finish)
            if want_usage:
                prompt_tokens = len(TOKEN_RE.findall(body["prompt"]))
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n_completion,
                    "total_tokens": prompt_tokens + n_completion,
                }
                yield "data: " + json.dumps({"id": rid, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
            done = True
        finally:
            STATE["active"] -= 1
            STATE["finished" if done else "cancelled"] += 1

    return StreamingResponse(stream(), media_type="text/event-stream")


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
