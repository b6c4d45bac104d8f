"""`mathforge sandbox`: a code-execution server wire-compatible with NeMo-Skills' sandbox.

Endpoints (NeMo-Skills' `local_sandbox_server.py` protocol, see shared/reference/nemo_skills.md §1):
    POST   /execute             body {generated_code, timeout, language, std_input, max_output_characters,
                                traceback_verbosity}; header X-Session-ID (required for ipython)
    GET    /health              {"status": "healthy", "worker": ..., plus isolation facts and load}
    GET    /sessions            {"sessions": {id: {backend, created, last_used, alive}}, "backend": "ipython"}
    DELETE /sessions/<id>       200 {"message": ...} | 404 {"error": ...}

Each ipython session is a worker process tree (worker.py) isolated as limits.py describes; other
languages (python, python3, pypy3, shell) run once in a fresh worker of the same kind. The server never
runs untrusted code itself, is not dumpable (its /proc files are root-only), and treats every worker
answer as untrusted input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mathforge.errors import UserError
from mathforge.sandbox import limits
from mathforge.sandbox.config import SandboxConfig

LOG = logging.getLogger("mathforge.sandbox")

WORKER_PY = str(Path(__file__).with_name("worker.py"))
READ_LIMIT = 64 << 20  # longest worker answer line (outputs are capped long before this)
CAPTURE_SLACK = 65536  # characters kept beyond max_output_characters, for post-processing to eat
CAPTURE_CEILING = 2_000_000
VERBOSITIES = {
    "plain": "Plain",
    "context": "Context",
    "verbose": "Verbose",
    "minimal": "Minimal",
    "docs": "Docs",
}
SUBPROCESS_LANGUAGES = ("python", "python3", "pypy3", "shell")
# A fixed environment of our own for sandboxed code; nothing is inherited from the server.
CODE_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


WORKER_DIED = (
    "The execution worker died and the session's state was lost (the code crashed, exited or was killed)\n"
)


class WorkerDied(Exception):
    """The worker's process tree ended or broke the protocol."""


class Busy(Exception):
    """No execution slot and no room in the queue."""


# ---------------------------------------------------------------- output post-processing (NeMo-Skills)

_ANSI = re.compile(r"\x1B(?:[@-Z\-_]|\[[0-?]*[ -/]*[@-~])")
_OUT_PROMPT = re.compile(r"^Out\[\d+\]:\s*")


def postprocess_output(output: str, verbosity: str) -> str:
    """NeMo-Skills' `postprocess_output`: only for Plain/Minimal tracebacks."""
    if verbosity not in ("Minimal", "Plain"):
        return output
    output = _ANSI.sub("", output)
    lines = []
    for line in output.split("\n"):
        if line.strip().startswith("File <ipython-"):
            continue
        lines.append(_OUT_PROMPT.sub("", line))
    while lines and lines[0] == "":
        lines.pop(0)
    output = "\n".join(lines).rstrip()
    return output + ("\n" if output else "")


def truncate(text: str, limit: int) -> str:
    return text[:limit] + "<output cut>" if len(text) > limit else text


def clean_text(text) -> str:
    """Anything a worker sent, as a string that encodes to UTF-8 (lone surrogates replaced)."""
    if not isinstance(text, str):
        return ""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def timeout_text(timeout) -> str:
    return f"Execution timed out after {timeout} seconds\n"


# ---------------------------------------------------------------- workers


class WorkerPool:
    """Spawns workers: slots (one uid per slot when root), working directories, the isolation mode."""

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.mode = "none"
        self.report: dict = {}
        self.shell = "unknown"
        n = cfg.max_sessions + cfg.max_workers + 1
        self._free = list(range(n))
        self.base = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="mathforge-sandbox-"))
        self._own_base = cfg.workdir is None
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o711)
        if os.geteuid() == 0:
            closed = limits.blocked_ancestor(str(self.base.resolve() / "w"))
            if closed:
                raise UserError(
                    f"--workdir {self.base}: {closed} is closed to other users (mode "
                    f"{oct(os.stat(closed).st_mode & 0o777)}); the sandbox uids must be able to "
                    "traverse every parent directory"
                )
        self.workers: set[Worker] = set()

    def take_slot(self) -> int:
        if not self._free:
            raise Busy("no free worker slot")
        return self._free.pop(0)

    def give_slot(self, slot: int) -> None:
        self._free.append(slot)

    def candidates(self) -> list[str]:
        if self.cfg.isolation == "none":
            return ["uid", "none"] if os.geteuid() == 0 else ["none"]
        return ["root", "uid"] if os.geteuid() == 0 else ["userns", "none"]

    async def probe(self) -> None:
        """Pick the strongest isolation that works here, by starting a real worker with it."""
        errors = []
        for mode in self.candidates():
            self.mode = mode
            worker = Worker(self, "session")
            try:
                await worker.start()
            except WorkerDied as exc:
                errors.append(f"{mode}: {exc}")
                await worker.kill()
                continue
            self.report, self.shell = worker.report, worker.shell
            await worker.kill()
            if errors:
                self.report.setdefault("warnings", []).extend(f"isolation mode refused: {e}" for e in errors)
            return
        hint = (
            " (as root without namespaces the sandbox uids must be able to read the Python installation; "
            "--isolation none runs code as root, which is not recommended)"
            if os.geteuid() == 0
            else ""
        )
        raise RuntimeError("no sandbox worker could start: " + "; ".join(errors) + hint)

    @property
    def network_isolated(self) -> bool:
        return self.report.get("interfaces") == ["lo"]

    def facts(self) -> dict:
        return {
            "mode": self.mode,
            "network_namespace": self.mode in ("root", "userns"),
            "network_isolated": self.network_isolated,
            "pid_namespace": self.mode in ("root", "userns"),
            "mount_namespace": self.mode in ("root", "userns"),
            "uid_per_worker": self.mode in ("root", "uid"),
            "worker_uid": self.report.get("uid"),
            "interfaces_seen_by_code": self.report.get("interfaces"),
            "limits": {
                "memory_bytes": self.cfg.memory_limit,
                "cpu_seconds": self.cfg.cpu_limit,
                "processes": self.cfg.nproc_limit,
                "file_size_bytes": self.cfg.file_size_limit,
                "open_files": self.cfg.open_files_limit,
                "disk_bytes": self.cfg.disk_limit,
            },
        }

    def warnings(self) -> list[str]:
        out = list(self.report.get("warnings", []))
        if not self.network_isolated:
            out.insert(
                0,
                "NO NETWORK ISOLATION: sandboxed code can reach the network "
                f"(interfaces: {self.report.get('interfaces')}); run inside a container with "
                "--network none or on a host that allows network namespaces",
            )
        elif self.mode not in ("root", "userns"):
            out.insert(
                0,
                "no namespaces: network isolation comes only from the surrounding container; "
                "PID/mount isolation is off",
            )
        return out

    async def close(self) -> None:
        await asyncio.gather(*(w.kill() for w in list(self.workers)), return_exceptions=True)
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)


class Worker:
    """One worker process tree (see worker.py) and its JSON-lines channel."""

    def __init__(self, pool: WorkerPool, kind: str):
        self.pool, self.kind = pool, kind
        self.slot: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.child_pid: int | None = None
        self.workdir: Path | None = None
        self.report: dict = {}
        self.shell = ""
        self.dead = False
        self._killed = False
        self._kill_lock = asyncio.Lock()

    @property
    def uid(self) -> int:
        return self.pool.cfg.uid_base + (self.slot or 0)

    def argv_config(self) -> dict:
        cfg = self.pool.cfg
        return {
            "mode": self.kind,
            "isolation": self.pool.mode,
            "workdir": str(self.workdir),
            "uid": self.uid,
            "gid": self.uid,
            "disk": cfg.disk_limit,
            "nice": cfg.nice,
            "shell": cfg.shell,
            "env": CODE_ENV,
            "limits": {
                "memory": cfg.memory_limit,
                "cpu": cfg.cpu_limit,
                "nproc": cfg.nproc_limit,
                "fsize": cfg.file_size_limit,
                "nofile": cfg.open_files_limit,
            },
        }

    async def start(self) -> None:
        pool = self.pool
        self.slot = pool.take_slot()
        pool.workers.add(self)
        self.workdir = pool.base / f"w{self.slot}-{secrets.token_hex(4)}"
        self.workdir.mkdir(mode=0o700)
        if pool.mode in ("root", "uid"):
            os.chown(self.workdir, self.uid, self.uid)
        argv = [pool.cfg.python, "-I", "-B", "-X", "utf8", WORKER_PY, json.dumps(self.argv_config())]
        global SPAWNING
        SPAWNING += 1  # until the pid is in MANAGED, reap_strays must not touch our new child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={},
                cwd="/",
                start_new_session=True,
                limit=READ_LIMIT,
            )
            MANAGED.add(self.proc.pid)
        except OSError as exc:
            raise WorkerDied(f"cannot start {pool.cfg.python}: {exc}") from exc
        finally:
            SPAWNING -= 1
        try:
            await asyncio.wait_for(self._handshake(), pool.cfg.spawn_timeout)
        except TimeoutError as exc:
            raise WorkerDied(f"worker did not start within {pool.cfg.spawn_timeout} s") from exc

    async def _handshake(self) -> None:
        while True:
            msg = await self._read()
            event = msg.get("event")
            if event == "spawned":
                self.child_pid = int(msg["pid"])
            elif event == "ready":
                self.report = msg.get("report") or {}
                self.shell = str(msg.get("shell", ""))
                return
            elif event == "error":
                raise WorkerDied(str(msg.get("error")))

    async def _read(self) -> dict:
        try:
            line = await self.proc.stdout.readline()
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise WorkerDied("worker answer too long") from exc
        if not line:
            err = b""
            with contextlib.suppress(Exception):
                err = await asyncio.wait_for(self.proc.stderr.read(4096), 0.5)
            code = self.proc.returncode
            detail = f" (exit status {code})" if code is not None else ""
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
            raise WorkerDied("worker ended" + detail + (f": {tail[0]}" if tail else ""))
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise WorkerDied("worker sent something that is not JSON") from exc
        if not isinstance(msg, dict):
            raise WorkerDied("worker sent something that is not a JSON object")
        return msg

    async def call(self, msg: dict, timeout: float) -> dict:
        """Send one request and wait up to `timeout` s for its answer (asyncio.TimeoutError otherwise)."""
        if self.dead or self.proc is None or self.proc.returncode is not None:
            raise WorkerDied("worker is gone")
        msg = dict(msg, id=secrets.token_hex(8))
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            await self.proc.stdin.drain()
        except (ConnectionError, RuntimeError, OSError) as exc:
            raise WorkerDied(f"worker is gone: {exc}") from exc
        answer = await asyncio.wait_for(self._read(), timeout)
        if answer.get("id") != msg["id"] or answer.get("status") != "ok":
            raise WorkerDied("worker answer out of step with the request")
        return answer

    def alive(self) -> bool:
        return not self.dead and self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """Take the whole tree down, wait for it, clean up the directory, free the slot. Idempotent."""
        async with self._kill_lock:
            if self._killed:
                return
            self._killed = self.dead = True
            try:
                await self._kill_tree()
            finally:
                if self.workdir is not None:
                    await asyncio.to_thread(shutil.rmtree, self.workdir, True)
                if self.slot is not None:
                    self.pool.give_slot(self.slot)
                self.pool.workers.discard(self)

    async def _kill_tree(self) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        others: list[int] = []
        with contextlib.suppress(Exception):  # already gone
            others = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        # The child first (with a PID namespace: its init, whose death kills everything inside), so the
        # nanny reaps it and exits by itself; then whatever is left of the tree and the process group.
        if self.child_pid:
            limits.kill_quietly(self.child_pid)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), 0.5)
        for p in others:
            limits.kill_quietly(p)
        limits.kill_quietly(pid, group=True)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            LOG.error("worker %s did not exit after SIGKILL", pid)
        MANAGED.discard(pid)
        if self.pool.mode == "uid":  # no PID namespace: everything left under this uid goes
            await sweep_uid(self.uid)
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        reap_strays()


MANAGED: set[int] = set()  # pids of our own children that asyncio waits for
SPAWNING = 0  # children being started whose pid is not known yet


def reap_strays() -> None:
    """We are a child subreaper: orphans of dead workers end up as our children. Reap the dead ones
    (never the processes asyncio is waiting for)."""
    if SPAWNING:
        return
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        if child.pid in MANAGED:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
            elif child.ppid() == os.getpid() and child.pid not in MANAGED:
                # a live orphan from a worker tree (only possible without a PID namespace)
                limits.kill_quietly(child.pid)
        except (psutil.Error, ChildProcessError, OSError):
            pass


async def sweep_uid(uid: int) -> None:
    """Kill every process of `uid` (kill(-1) from a helper running as that uid)."""
    kill = shutil.which("kill") or "/bin/kill"
    try:
        global SPAWNING
        SPAWNING += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                kill,
                "-KILL",
                "--",
                "-1",
                user=uid,
                group=uid,
                extra_groups=[],
                env={},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            MANAGED.add(proc.pid)
        finally:
            SPAWNING -= 1
        try:
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            MANAGED.discard(proc.pid)
    except Exception as exc:  # noqa: BLE001
        LOG.warning("uid %d sweep failed: %s", uid, exc)


# ---------------------------------------------------------------- sessions and admission


@dataclass
class Session:
    id: str
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    worker: Worker | None = None
    restart_pending: bool = False
    users: int = 0  # requests holding or waiting for the lock
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Admission:
    """At most `running` requests execute; `queue` more may wait; the rest are refused (HTTP 503)."""

    def __init__(self, running: int, queue: int):
        self.limit = running + queue
        self.inside = 0
        self.running = 0
        self._sem = asyncio.Semaphore(running)

    @contextlib.contextmanager
    def ticket(self):
        if self.inside >= self.limit:
            raise Busy(f"sandbox busy: {self.running} executing, {self.inside - self.running} queued")
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    @contextlib.asynccontextmanager
    async def slot(self):
        async with self._sem:
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1


class Sandbox:
    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.pool = WorkerPool(cfg)
        self.sessions: dict[str, Session] = {}
        self.admission = Admission(cfg.max_workers, cfg.queue)
        self._tasks: set[asyncio.Task] = set()
        self._expiry: asyncio.Task | None = None
        self.started = time.time()

    async def start(self) -> None:
        limits.make_undumpable()
        with contextlib.suppress(OSError):  # orphans of worker trees become ours to reap
            limits.prctl(limits.PR_SET_CHILD_SUBREAPER, 1)
        await self.pool.probe()
        facts = self.pool.facts()
        LOG.info("sandbox isolation: %s; shell: %s", json.dumps(facts), self.pool.shell)
        warnings = self.pool.warnings()
        for w in warnings:
            LOG.warning("!!! %s", w)
        if self.cfg.isolation == "strict" and not self.pool.network_isolated:
            raise RuntimeError("--isolation strict: sandboxed code would have network access")
        self._expiry = asyncio.create_task(self._expire_loop())

    async def close(self) -> None:
        if self._expiry:
            self._expiry.cancel()
        await self.pool.close()
        self.sessions.clear()

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions

    async def _expire_loop(self) -> None:
        while True:
            period = min(30.0, self.cfg.session_timeout / 2) if self.cfg.session_timeout > 0 else 30.0
            await asyncio.sleep(max(period, 0.5))
            try:
                await self.expire()
                reap_strays()
            except Exception:  # noqa: BLE001
                LOG.exception("session expiry failed")

    async def expire(self) -> None:
        now = time.time()
        limit = self.cfg.session_timeout
        for sid, sess in list(self.sessions.items()):
            idle = now - sess.last_used
            if sess.users == 0 and ((limit > 0 and idle > limit) or (sess.worker is None and idle > 3600)):
                LOG.info("session %s expired after %.0f s idle", sid, idle)
                await self._drop(sid)

    async def _drop(self, sid: str) -> bool:
        sess = self.sessions.pop(sid, None)
        if sess is None:
            return False
        if sess.worker is not None:
            worker, sess.worker = sess.worker, None
            await worker.kill()
        return True

    async def _make_room(self) -> None:
        """Keep live session workers under max_sessions: stop the least recently used idle one."""
        live = [s for s in self.sessions.values() if s.worker is not None]
        if len(live) < self.cfg.max_sessions:
            return
        idle = sorted((s for s in live if s.users == 0), key=lambda s: s.last_used)
        if not idle:
            raise Busy(f"all {self.cfg.max_sessions} sessions are busy")
        LOG.info("evicting idle session %s (max sessions %d)", idle[0].id, self.cfg.max_sessions)
        await self._drop(idle[0].id)

    async def delete_session(self, sid: str) -> bool:
        sess = self.sessions.get(sid)
        if sess is None:
            return False
        self.sessions.pop(sid, None)
        if sess.worker is not None:
            worker, sess.worker = sess.worker, None
            await worker.kill()  # a request still running on it gets "worker died"
        return True

    # -- execution

    async def run_ipython(self, sid: str, code: str, timeout, verbosity: str, cap: int) -> tuple[int, dict]:
        with self.admission.ticket():
            sess = self.sessions.get(sid)
            created = sess is None
            if created:
                sess = self.sessions[sid] = Session(sid)
            sess.users += 1
            try:
                async with sess.lock, self.admission.slot():
                    return await self._run_in_session(sess, created, code, timeout, verbosity, cap)
            finally:
                sess.users -= 1
                sess.last_used = time.time()

    async def _run_in_session(
        self, sess: Session, created: bool, code: str, timeout, verbosity: str, cap: int
    ) -> tuple[int, dict]:
        recently_restarted = sess.restart_pending
        sess.restart_pending = False
        if sess.worker is not None and not sess.worker.alive():  # died between requests
            worker, sess.worker = sess.worker, None
            await worker.kill()
            recently_restarted = True
        detached = self.sessions.get(sess.id) is not sess  # deleted while this request waited
        if detached:
            created = True
        if sess.worker is None:
            await self._make_room()
            worker = Worker(self.pool, "session")
            try:
                await worker.start()
            except (WorkerDied, Busy) as exc:
                await worker.kill()
                LOG.error("session %s: worker failed to start: %s", sess.id, exc)
                return 500, {
                    "process_status": "error",
                    "stdout": "",
                    "stderr": f"Sandbox worker failed to start: {exc}\n",
                    "new_session_created": True,
                }
            sess.worker = worker
            if not created:
                recently_restarted = True
        new_session = created or recently_restarted
        effective = min(float(timeout), self.cfg.max_timeout)
        shown = timeout if effective == float(timeout) else effective
        try:
            answer = await sess.worker.call(
                {"cmd": "exec", "code": code, "verbosity": verbosity, "cap": cap}, effective
            )
        except TimeoutError:
            LOG.warning("session %s timed out after %ss; worker killed, state lost", sess.id, shown)
            await self._lose_worker(sess)
            return 200, {
                "process_status": "timeout",
                "stdout": "",
                "stderr": timeout_text(shown),
                "new_session_created": True,
            }
        except WorkerDied as exc:
            LOG.warning("session %s: worker died (%s); state lost", sess.id, exc)
            await self._lose_worker(sess)
            return 200, {
                "process_status": "error",
                "stdout": "",
                "stderr": WORKER_DIED,
                "new_session_created": True,
            }
        if detached or self.sessions.get(sess.id) is not sess:  # nobody can reach this worker again
            await self._lose_worker(sess)
        status = "error" if answer.get("has_error") else "completed"
        return 200, {
            "process_status": status,
            "stdout": postprocess_output(clean_text(answer.get("stdout")), verbosity),
            "stderr": postprocess_output(clean_text(answer.get("stderr")), verbosity),
            "new_session_created": new_session,
        }

    async def _lose_worker(self, sess: Session) -> None:
        worker, sess.worker = sess.worker, None
        sess.restart_pending = True  # NeMo-Skills: the next request also reports new_session_created
        if worker is not None:
            await worker.kill()

    async def run_once(self, language: str, code: str, std_input: str, timeout, cap: int) -> tuple[int, dict]:
        if language == "pypy3":
            exe = shutil.which("pypy3")
            if exe is None:
                return 200, {
                    "process_status": "error",
                    "stdout": "",
                    "stderr": "pypy3 is not installed in this sandbox\n",
                }
            argv = [exe, "-c", code]
        elif language == "shell":
            argv = ["/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh", "-c", code]
        else:
            argv = [self.cfg.python, "-c", code]
        with self.admission.ticket():
            async with self.admission.slot():
                worker = Worker(self.pool, "oneshot")
                try:
                    await worker.start()
                    effective = min(float(timeout), self.cfg.max_timeout)
                    shown = timeout if effective == float(timeout) else effective
                    try:
                        answer = await worker.call(
                            {"cmd": "run", "argv": argv, "stdin": std_input, "cap": cap}, effective
                        )
                    except TimeoutError:
                        return 200, {"process_status": "timeout", "stdout": "", "stderr": timeout_text(shown)}
                except WorkerDied as exc:
                    LOG.warning("one-shot %s run: worker died (%s)", language, exc)
                    return 200, {"process_status": "error", "stdout": "", "stderr": WORKER_DIED}
                finally:
                    await worker.kill()
        stdout, stderr = clean_text(answer.get("stdout")), clean_text(answer.get("stderr"))
        if language == "shell":
            status = "completed" if answer.get("returncode") == 0 else "error"
        else:
            status = "completed"  # as NeMo-Skills: the process ran; a traceback is in stderr
        return 200, {"process_status": status, "stdout": stdout, "stderr": stderr}

    def health(self) -> dict:
        return {
            "status": "healthy",
            "worker": os.environ.get("WORKER_NUM", "unknown"),
            "shell": self.pool.shell,
            "isolation": self.pool.facts(),
            "warnings": self.pool.warnings(),
            "sessions": len(self.sessions),
            "live_workers": len(self.pool.workers),
            "executing": self.admission.running,
            "queued": self.admission.inside - self.admission.running,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
        }


# ---------------------------------------------------------------- HTTP


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _parse_request(body: dict) -> dict:
    """Validate /execute fields the way NeMo-Skills' server reads them (defaults included)."""
    code = body.get("generated_code")
    if not isinstance(code, str):
        raise ValueError("'generated_code' (a string) is required")
    timeout = body.get("timeout")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError("'timeout' (a number of seconds) is required")
    if not math.isfinite(float(timeout)) or timeout <= 0:
        raise ValueError("'timeout' must be a positive number of seconds")
    language = body.get("language", "ipython")
    if language != "ipython" and language not in SUBPROCESS_LANGUAGES and language != "lean4":
        raise ValueError(f"unsupported language {language!r} (ipython, python, python3, pypy3, shell)")
    std_input = body.get("std_input", "")
    if not isinstance(std_input, str):
        raise ValueError("'std_input' must be a string")
    max_chars = body.get("max_output_characters", 1000)
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
        raise ValueError("'max_output_characters' must be a non-negative integer")
    verbosity = body.get("traceback_verbosity", "Plain")
    if not isinstance(verbosity, str) or verbosity.lower() not in VERBOSITIES:
        raise ValueError(f"'traceback_verbosity' must be one of {sorted(VERBOSITIES.values())}")
    return {
        "code": code,
        "timeout": timeout,
        "language": language,
        "std_input": std_input,
        "max_chars": max_chars,
        "verbosity": VERBOSITIES[verbosity.lower()],
    }


def create_app(cfg: SandboxConfig | None = None) -> FastAPI:
    cfg = cfg or SandboxConfig()
    sandbox = Sandbox(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await sandbox.start()
        try:
            yield
        finally:
            await sandbox.close()

    app = FastAPI(
        title="mathforge sandbox", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.sandbox = sandbox

    @app.post("/execute")
    async def execute(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
            return _error(413, f"request body larger than {cfg.max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                return _error(413, f"request body larger than {cfg.max_body_bytes} bytes")
        try:
            body = json.loads(bytes(raw))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return _error(400, f"request body is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        try:
            req = _parse_request(body)
        except ValueError as exc:
            return _error(400, str(exc))
        max_chars = min(req["max_chars"], cfg.max_output_characters)
        cap = min(max_chars + CAPTURE_SLACK, CAPTURE_CEILING)
        session_id = request.headers.get("x-session-id")
        try:
            if req["language"] == "ipython":
                if session_id is None:
                    return _error(400, "X-Session-ID header required for ipython sessions")
                if len(session_id) > 1024:
                    return _error(400, "X-Session-ID longer than 1024 characters")
                status, result = await sandbox.run_ipython(
                    session_id, req["code"], req["timeout"], req["verbosity"], cap
                )
            elif req["language"] == "lean4":
                status, result = (
                    200,
                    {
                        "process_status": "error",
                        "stdout": "",
                        "stderr": "lean4 is not available in this sandbox\n",
                    },
                )
            else:
                status, result = await sandbox.run_once(
                    req["language"], req["code"], req["std_input"], req["timeout"], cap
                )
        except Busy as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        result["stdout"] = truncate(result["stdout"], max_chars)
        result["stderr"] = truncate(result["stderr"], max_chars)
        return JSONResponse(result, status_code=status)

    @app.get("/health")
    async def health():
        return sandbox.health()

    @app.get("/sessions")
    async def list_sessions():
        return {
            "sessions": {
                sid: {
                    "backend": "ipython",
                    "created": s.created,
                    "last_used": s.last_used,
                    "alive": s.worker is not None and s.worker.alive(),
                    "pid": s.worker.proc.pid if s.worker and s.worker.proc else None,
                }
                for sid, s in sandbox.sessions.items()
            },
            "backend": "ipython",
        }

    @app.delete("/sessions/{session_id}")
    async def delete_session(session_id: str):
        if await sandbox.delete_session(session_id):
            return {"message": f"IPython session {session_id} deleted successfully"}
        return _error(404, f"IPython session {session_id} not found")

    return app


def serve(cfg: SandboxConfig) -> None:
    """Run the server in this process until SIGINT/SIGTERM."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg.validate()
    app = create_app(cfg)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        access_log=False,
        timeout_keep_alive=30,
        lifespan="on",
    )

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # As a container's PID 1 without signal handlers, the kernel drops every signal sent from
            # inside the container, so sandboxed code sharing our uid cannot stop us. Stop the container
            # with SIGKILL (compose: stop_signal).
            if os.getpid() == 1:
                yield
            else:
                with super().capture_signals():
                    yield

    server = Server(config)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    sockets = None
    if cfg.uds:  # TCP as usual, plus the Unix socket
        import socket

        tcp = config.bind_socket()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.uds)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(cfg.uds)
        os.chmod(cfg.uds, 0o666)
        unix.listen(config.backlog)
        sockets = [tcp, unix]
        LOG.info("listening on http://%s:%d and unix:%s", cfg.host, cfg.port, cfg.uds)
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(1)
