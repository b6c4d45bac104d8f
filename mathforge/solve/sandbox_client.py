"""HTTP client for a NeMo-Skills-compatible code sandbox (`mathforge sandbox`, or NeMo-Skills' own).

Behaves as NeMo-Skills' `LocalSandbox` (reference §1.5): `POST /execute` with the same body, the session
id in an `X-Session-ID` header (ipython only), client timeout = execution timeout + 5 s, NeMo-Skills'
error mapping (HTTP 502 and client timeouts read as timeouts, a non-JSON body as an error), state
restoration when the server reports that it had to start a fresh session (replay the session's successful
cells, then the new one), and `DELETE /sessions/<id>` with retries, a 404 counting as success.
One addition: HTTP 503 (the sandbox's queue is full) is retried with backoff before it is reported.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx

LANGUAGES = ("ipython", "python", "python3", "pypy3", "lean4", "shell")
BUSY_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)  # HTTP 503 (sandbox queue full) is retried after these
RESTORE_FAILED = (
    "RuntimeError: Sandbox state restoration failed after the execution worker restarted. The interactive "
    "session history has been cleared; please re-run the last code block without relying on prior state.\n"
)


def new_session_id() -> str:
    return str(uuid.uuid4())


class SandboxClient:
    """`async with SandboxClient("http://127.0.0.1:6000") as sb: out = await sb.execute(code, session_id=sid)`."""

    def __init__(self, url: str, *, max_connections: int = 256) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(30.0),
        )
        self._histories: dict[str, list[str]] = {}

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.aclose()

    async def health(self) -> dict:
        resp = await self._client.get(f"{self.url}/health", timeout=5.0)
        resp.raise_for_status()
        return resp.json()

    async def _post(self, body: dict, session_id: str | None, timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if session_id is not None:
            headers["X-Session-ID"] = session_id
        for delay in (*BUSY_RETRY_DELAYS, None):
            try:
                resp = await self._client.post(
                    f"{self.url}/execute", content=json.dumps(body), headers=headers, timeout=timeout + 5.0
                )
            except httpx.TimeoutException:
                return {"process_status": "timeout", "stdout": "", "stderr": "Client timed out\n"}
            if resp.status_code != 503 or delay is None:
                break
            await asyncio.sleep(delay)  # the sandbox's queue is full: wait for a worker, then retry
        if resp.status_code == 502:
            return {"process_status": "timeout", "stdout": "", "stderr": "Client timed out\n"}
        try:
            out = resp.json()
        except ValueError:
            return {"process_status": "error", "stdout": "", "stderr": "Unknown error"}
        if not isinstance(out, dict) or "process_status" not in out:
            msg = out.get("error") if isinstance(out, dict) else None
            return {"process_status": "error", "stdout": "", "stderr": f"{msg or 'Unknown error'}\n"}
        return out

    async def execute(
        self,
        code: str,
        *,
        session_id: str | None = None,
        language: str = "ipython",
        timeout: float = 10.0,
        max_output_characters: int = 1000,
        traceback_verbosity: str = "plain",
        std_input: str = "",
    ) -> dict:
        """Run `code`; returns `{"process_status", "stdout", "stderr"}` (never raises for code failures).

        ipython keeps state per `session_id` (pass the same id for every cell of one solution); the other
        languages are stateless and take no session id. Connection failures raise `httpx.HTTPError`.
        """
        if language not in LANGUAGES:
            raise ValueError(f"unsupported sandbox language {language!r}; choose from {', '.join(LANGUAGES)}")
        if session_id is not None and language != "ipython":
            raise RuntimeError(f"session ids are only supported for ipython, not {language!r}")
        verbosity = traceback_verbosity.capitalize()
        if verbosity != "Plain" and language != "ipython":
            raise ValueError("traceback_verbosity other than 'plain' needs language='ipython'")
        if language == "ipython" and session_id is None:
            session_id = new_session_id()
        body = {
            "generated_code": code,
            "std_input": std_input,
            "timeout": timeout,
            "language": language,
            "max_output_characters": max_output_characters,
            "traceback_verbosity": verbosity,
        }
        out = await self._post(body, session_id if language == "ipython" else None, timeout)
        new_session = bool(out.pop("new_session_created", False))
        if language != "ipython" or session_id is None:
            return out
        history = self._histories.setdefault(session_id, [])
        if new_session and history and out.get("process_status") != "timeout":
            out = await self._restore_and_run(session_id, history, body, timeout)
            if out is None:
                self._histories.pop(session_id, None)
                return {"process_status": "error", "stdout": "", "stderr": RESTORE_FAILED}
        if out.get("process_status") == "completed":
            history.append(code)
        return out

    async def _restore_and_run(self, session_id: str, history: list[str], body: dict, timeout: float):
        """The server lost this session's state: replay the successful cells, then run the new one."""
        await self.delete_session(session_id, forget_history=False)
        for cell in history:
            replay = await self._post({**body, "generated_code": cell}, session_id, timeout)
            replay.pop("new_session_created", None)
            if replay.get("process_status") != "completed":
                await self.delete_session(session_id)
                return None
        out = await self._post(body, session_id, timeout)
        out.pop("new_session_created", None)
        return out

    async def delete_session(self, session_id: str, *, forget_history: bool = True) -> None:
        """Free the session's worker. A 404 (unknown session) counts as done; transient errors retry 3 times."""
        if forget_history:
            self._histories.pop(session_id, None)
        for attempt in range(3):
            try:
                resp = await self._client.delete(
                    f"{self.url}/sessions/{session_id}", headers={"X-Session-ID": session_id}, timeout=10.0
                )
                if resp.status_code == 404 or resp.status_code < 400:
                    return
                resp.raise_for_status()
            except (httpx.TransportError, httpx.HTTPStatusError):
                if attempt == 2:
                    raise
                await asyncio.sleep(2.0)
