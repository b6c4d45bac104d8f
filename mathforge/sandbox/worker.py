"""The sandbox worker: one per session (or per one-shot run), started by the server as

    <python> -I -B -X utf8 .../mathforge/sandbox/worker.py '<json config>'

with an empty environment, in a new session/process group. Standard library only; it imports its
siblings `limits` and `shell` by path, so the sandbox may run a different Python than the server.

Process tree (isolation modes in limits.py):

    nanny   the started process: process-group leader and child subreaper. Enters the new network,
            mount and PID namespaces, forks, reports the child's pid, then only waits.
    init    PID 1 of the new PID namespace: makes the filesystem read-only except a fresh tmpfs
            working directory, mounts a private /proc, brings up a private loopback, forks the shell and
            reaps orphans. When the shell ends, init exits and the kernel kills everything left inside.
    shell   drops privileges (own uid, or a nested user namespace), applies rlimits, enters the working
            directory with an empty environment and runs cells. Without namespaces the nanny forks the
            shell directly.

Protocol (JSON lines): the server writes requests to the worker's stdin; answers come back on its
stdout. Both are moved to private descriptors at start-up; descriptors 0-2 of the code are /dev/null.
    -> {"event": "spawned", "pid": <host pid of init or shell>}      (from the nanny)
    -> {"event": "ready", "shell": "ipython"|"builtin", "report": {...}}   or {"event": "error", ...}
    <- {"cmd": "exec", "id": "...", "code": "...", "verbosity": "Plain", "cap": 66536}
    -> {"id": "...", "status": "ok", "stdout": "...", "stderr": "...", "has_error": false}
    <- {"cmd": "run", "id": "...", "argv": [...], "stdin": "...", "cap": 66536}        (one-shot mode)
    -> {"id": "...", "status": "ok", "stdout": "...", "stderr": "...", "returncode": 0}
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _sibling(name: str):
    """Import a sibling module by path under a private name (nothing added to sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"_mathforge_sandbox_{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


if __package__:
    from . import limits
    from . import shell as shells
else:  # started by path
    limits = _sibling("limits")
    shells = _sibling("shell")

_dumps = json.dumps
_loads = json.loads


class Channel:
    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        self._reader = None

    def send(self, msg: dict) -> None:
        data = (_dumps(msg, ensure_ascii=True) + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def recv(self) -> dict | None:
        if self._reader is None:
            self._reader = os.fdopen(self.rfd, "rb", closefd=False)
        line = self._reader.readline()
        if not line:
            return None
        return _loads(line)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def _devnull_stdio(keep_stderr: bool) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _wait_for(pid: int) -> int:
    """Reap children (orphans included) until `pid` exits; return its exit status as a shell would."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if got == pid:
            return os.waitstatus_to_exitcode(status)


# ---------------------------------------------------------------- the three roles


def _die_with_parent(expected_parent: int) -> None:
    limits.prctl(limits.PR_SET_PDEATHSIG, signal.SIGKILL)
    # the parent already gone? (a PID namespace's first process sees its parent as pid 0)
    if os.getppid() not in (expected_parent, 0):
        os._exit(1)


def nanny(cfg: dict) -> None:
    _die_with_parent(os.getppid())  # the server went away (even by SIGKILL): so do we
    chan = Channel(os.dup(0), os.dup(1))
    _devnull_stdio(keep_stderr=True)
    mode = cfg["isolation"]
    limits.be_nice(int(cfg.get("nice", 0)))
    try:
        limits.prctl(limits.PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        pass
    try:
        limits.enter_namespaces(mode)
    except OSError as exc:
        chan.send({"event": "error", "error": f"cannot create namespaces for isolation mode {mode!r}: {exc}"})
        os._exit(3)
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _die_with_parent(me)
            if limits.ns_flags(mode):
                init(cfg, chan)
            else:
                shell(cfg, chan, [])
        except BaseException as exc:  # noqa: BLE001
            try:
                chan.send({"event": "error", "error": f"worker set-up failed: {type(exc).__name__}: {exc}"})
            finally:
                os._exit(3)
        os._exit(0)
    chan.send({"event": "spawned", "pid": pid})
    chan.close()
    code = _wait_for(pid)
    # leftovers that stayed in our process group (without a PID namespace): take them down with us
    try:
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(code & 0xFF)


def init(cfg: dict, chan: Channel) -> None:
    """PID 1 of the new PID namespace (dies with the nanny, see _die_with_parent)."""
    mode = cfg["isolation"]
    uid, gid = (cfg["uid"], cfg["gid"]) if mode == "root" else (0, 0)
    warnings = limits.setup_mounts(
        cfg["workdir"],
        disk_bytes=int(cfg["disk"]),
        uid=uid,
        gid=gid,
        new_proc=True,
        expose_paths=limits.interpreter_paths() if mode == "root" else None,
    )
    try:
        limits.loopback_up()
    except OSError as exc:
        warnings.append(f"could not bring up the private loopback: {exc}")
    pid = os.fork()
    if pid == 0:
        shell(cfg, chan, warnings)
        os._exit(0)
    chan.close()
    os._exit(_wait_for(pid) & 0xFF)


def shell(cfg: dict, chan: Channel, warnings: list[str]) -> None:
    mode = cfg["isolation"]
    lim = cfg["limits"]
    limits.drop_privileges(mode, int(cfg.get("uid", -1)), int(cfg.get("gid", -1)))
    nproc = int(lim["nproc"])
    if mode == "none" and nproc > 0:  # the count is shared with the server's uid: allow this many more
        nproc += limits.count_user_processes(os.getuid())
    limits.set_rlimits(
        memory=int(lim["memory"]),
        cpu=int(lim["cpu"]),
        nproc=nproc,
        fsize=int(lim["fsize"]),
        nofile=int(lim["nofile"]),
    )
    # The private directory holds the code's working directory plus a home and a temp directory of its
    # own, so tools that want $HOME or $TMPDIR (IPython, matplotlib, tempfile) leave the cwd alone.
    base = cfg["workdir"]
    paths = {name: os.path.join(base, name) for name in ("work", "home", "tmp")}
    for path in paths.values():
        os.makedirs(path, mode=0o700, exist_ok=True)
    os.chdir(paths["work"])
    os.environ.clear()
    os.environ.update(cfg.get("env", {}))
    os.environ.update(HOME=paths["home"], TMPDIR=paths["tmp"])
    try:
        limits.prctl(limits.PR_SET_PDEATHSIG, signal.SIGKILL)  # (credential changes reset it)
    except OSError:
        pass
    _devnull_stdio(keep_stderr=False)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    report = _report(mode, warnings)
    if cfg["mode"] == "oneshot":
        chan.send({"event": "ready", "shell": "process", "report": report})
        _oneshot(cfg, chan)
        return
    sh, warning = shells.make_shell(cfg.get("shell", "auto"))
    if warning:
        report["warnings"].append(warning)
    chan.send({"event": "ready", "shell": sh.name, "report": report})
    _session_loop(sh, chan, shells.Capture)


def _report(mode: str, warnings: list[str]) -> dict:
    import socket

    try:
        interfaces = [name for _, name in socket.if_nameindex()]
    except OSError:
        interfaces = []
    return {
        "mode": mode,
        "uid": os.getuid(),
        "pid": os.getpid(),
        "interfaces": interfaces,
        "warnings": list(warnings),
    }


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


def _session_loop(sh, chan: Channel, capture_cls) -> None:
    me = os.getpid()
    null = _Null()
    sys.stdout = sys.stderr = null
    while True:
        req = chan.recv()
        if req is None:
            os._exit(0)
        if req.get("cmd") != "exec":
            continue
        out, err = capture_cls(int(req["cap"])), capture_cls(int(req["cap"]))
        sys.stdout, sys.stderr = out, err
        try:
            has_error = sh.run_cell(req["code"], req.get("verbosity", "Plain"))
        except BaseException as exc:  # noqa: BLE001 — the shell itself failed; report, keep serving
            has_error = True
            try:
                err.write(f"{type(exc).__name__}: {exc}\n")
            except Exception:
                pass
        finally:
            sys.stdout = sys.stderr = null
        if os.getpid() != me:  # a fork() inside the cell came back here: that child is done
            os._exit(0)
        chan.send(
            {
                "id": req["id"],
                "status": "ok",
                "stdout": _text(out),
                "stderr": _text(err),
                "has_error": bool(has_error),
            }
        )


def _text(capture) -> str:
    try:
        return capture.getvalue()
    except Exception:
        return ""


def _oneshot(cfg: dict, chan: Channel) -> None:
    import subprocess
    import threading

    req = chan.recv()
    if req is None:
        return
    cap = int(req["cap"])
    try:
        proc = subprocess.Popen(
            req["argv"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cfg["workdir"],
            env=dict(os.environ),
        )
    except OSError as exc:
        chan.send({"id": req["id"], "status": "ok", "stdout": "", "stderr": f"{exc}\n", "returncode": 127})
        return
    got: dict[str, bytes] = {}

    def drain(name: str, stream) -> None:
        kept = bytearray()
        while True:
            chunk = stream.read(65536)
            if not chunk:
                break
            if len(kept) < cap * 4:
                kept += chunk[: cap * 4 - len(kept)]
        got[name] = bytes(kept)

    def feed() -> None:
        try:
            proc.stdin.write(req.get("stdin", "").encode())
        except OSError:
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    threads = [
        threading.Thread(target=drain, args=("stdout", proc.stdout), daemon=True),
        threading.Thread(target=drain, args=("stderr", proc.stderr), daemon=True),
        threading.Thread(target=feed, daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rc = proc.wait()

    def text(b: bytes) -> str:
        s = b.decode("utf-8", "replace")
        return s.replace("\r\n", "\n").replace("\r", "\n")

    chan.send(
        {
            "id": req["id"],
            "status": "ok",
            "stdout": text(got.get("stdout", b"")),
            "stderr": text(got.get("stderr", b"")),
            "returncode": rc,
        }
    )


def main() -> None:
    cfg = json.loads(sys.argv[1])
    nanny(cfg)


if __name__ == "__main__":
    main()
