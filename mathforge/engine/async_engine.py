"""AsyncEngine: the synchronous `Engine` on one background thread, bridged to asyncio.

The engine thread owns the Engine. It sleeps while there is nothing to do and otherwise loops:
apply queued commands (add / abort), run one step, hand each RequestOutput to its request's asyncio
queue with `loop.call_soon_threadsafe`. Torch releases the GIL inside kernels, so the event loop stays
responsive; nothing on the asyncio side waits for the engine thread.

Aborts take effect at the start of the next loop iteration — that is, right after the step in flight
(if any) and before the next one — so a disconnected client's slot is free before the next step ends.
An exception inside a step aborts the requests then in the engine (their consumers get the error),
and the thread carries on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Sequence

from mathforge.engine.api import EngineInputError, RequestOutput, SamplingParams
from mathforge.engine.engine import Engine

log = logging.getLogger("mathforge.engine")


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or never started)."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._pending_adds = 0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.step_errors = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AsyncEngine:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="mathforge-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError("the engine was shut down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------------ public API
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise EngineInputError for a request the engine would refuse (thread-safe, no side effects)."""
        self.engine.validate(prompt_token_ids, params)

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the increments of one request. Raises EngineInputError for a bad request.

        Closing the generator early (consumer stops iterating, task cancelled) aborts the request and
        frees its slot right away.
        """
        request_id = request_id or uuid.uuid4().hex
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise EngineInputError(f"request id {request_id!r} is already in use")
        self.engine.validate(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, queue)
        finished = False
        try:
            self._submit(("add", request_id, list(prompt_token_ids), params))
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True  # the engine already dropped it
                    raise out
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent, non-blocking). Its stream ends with finish_reason "abort"."""
        self._submit(("abort", request_id))

    def stats(self) -> dict:
        s = self.engine.stats()
        s["waiting"] += self._pending_adds
        s["engine_alive"] = self.is_running
        s["step_errors"] = self.step_errors
        return s

    # ------------------------------------------------------------------ engine thread
    def _submit(self, cmd: tuple) -> None:
        with self._cond:
            self._inbox.append(cmd)
            if cmd[0] == "add":
                self._pending_adds += 1
            self._cond.notify()

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._streams.pop(request_id, None)

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params = cmd
            self._pending_adds -= 1
            if rid not in self._streams:  # the consumer is already gone
                return
            try:
                self.engine.add_request(rid, prompt, params)
            except EngineInputError as exc:
                self._deliver(rid, exc)
        elif cmd[0] == "abort":
            out = self.engine.abort_request(cmd[1])
            if out is not None:
                self._deliver(cmd[1], out)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.engine.has_work() and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                cmds, self._inbox = self._inbox, []
            for cmd in cmds:
                try:
                    self._apply(cmd)
                except Exception:  # never let one request take the thread down
                    log.exception("engine command %s failed", cmd[:2])
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                self.step_errors += 1
                log.exception("engine step failed; aborting the requests in flight")
                try:
                    failed = self.engine.abort_all()
                except Exception:
                    log.exception("abort after a failed step failed")
                    failed = list(self._streams)
                err = RuntimeError(f"internal engine error: {type(exc).__name__}: {exc}")
                for rid in failed:
                    self._deliver(rid, err)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
