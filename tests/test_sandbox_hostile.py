"""Hostile code and hostile requests against a real `mathforge sandbox` subprocess.

For each attack: the answer is a clean error or timeout, the server stays healthy, the next request
succeeds, and no process is left behind (the session's process group and the sandbox uid range are
empty, the server has no stray children). All traffic stays on 127.0.0.1. The server's RSS is checked
to stay bounded across the whole module (last test).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from mathforge.sandbox import SandboxProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SECRET = "mf-secret-" + uuid.uuid4().hex
UID_BASE = 300000
SERVER_ARGS = [
    "--max-workers",
    "4",
    "--queue",
    "20",
    "--max-sessions",
    "64",
    "--memory-limit",
    "1g",
    "--nproc-limit",
    "32",
    "--file-size-limit",
    "8m",
    "--disk-limit",
    "32m",
    "--open-files-limit",
    "128",
    "--cpu-limit",
    "30",
    "--session-timeout",
    "0",
    "--uid-base",
    str(UID_BASE),
    "--log-level",
    "warning",
]


@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sandbox")
    env = dict(os.environ, MF_SANDBOX_TEST_SECRET=SECRET)
    args = SERVER_ARGS + (
        ["--python", os.environ["MATHFORGE_TEST_SANDBOX_PYTHON"]]
        if os.environ.get("MATHFORGE_TEST_SANDBOX_PYTHON")
        else []
    )
    with SandboxProcess(args=args, env=env, log_path=tmp / "server.log") as proc:
        proc.client = httpx.Client(base_url=proc.url, timeout=60)
        proc.facts = proc.health()["isolation"]
        run(proc, "print(1)", sid="warmup")
        delete(proc, "warmup")
        proc.rss_start = psutil.Process(proc.pid).memory_info().rss
        yield proc
        proc.client.close()


def run(sb, code, sid=None, timeout=5.0, **extra) -> dict:
    sid = sid or f"s-{uuid.uuid4()}"
    body = {
        "generated_code": code,
        "std_input": "",
        "timeout": timeout,
        "language": "ipython",
        "max_output_characters": 1000,
        "traceback_verbosity": "Plain",
        **extra,
    }
    r = sb.client.post(
        "/execute",
        content=json.dumps(body),
        headers={"X-Session-ID": sid, "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"process_status", "stdout", "stderr"}
    assert out["process_status"] in ("completed", "error", "timeout")
    return out


def delete(sb, sid):
    sb.client.delete(f"/sessions/{sid}", headers={"X-Session-ID": sid})


def worker_pgid(sb, sid) -> int:
    return sb.client.get("/sessions").json()["sessions"][sid]["pid"]


def sandbox_processes(sb) -> list[psutil.Process]:
    """Processes that belong to the sandbox: the server's descendants and anything in the uid range."""
    found = {p.pid: p for p in psutil.Process(sb.pid).children(recursive=True)}
    for p in psutil.process_iter(["uids"]):
        try:
            if UID_BASE <= p.info["uids"].real < UID_BASE + 200:
                found[p.pid] = p
        except (psutil.Error, TypeError):
            pass
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def in_group(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def assert_clean(sb, sid, pgid=None):
    """Healthy server, a working next request in the same session, then nothing left behind."""
    assert sb.client.get("/health").json()["status"] == "healthy"
    out = run(sb, "print(6 * 7)", sid=sid)
    assert out["process_status"] == "completed" and out["stdout"] == "42\n", out
    delete(sb, sid)
    deadline = time.time() + 10
    while True:
        left = sandbox_processes(sb) + ([psutil.Process(p) for p in in_group(pgid)] if pgid else [])
        if not left:
            break
        assert time.time() < deadline, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
        time.sleep(0.1)


def hostile(sb, code, timeout=2.0, expect=("error", "timeout")) -> tuple[dict, str, int]:
    sid = f"h-{uuid.uuid4()}"
    assert run(sb, "ready = True", sid=sid)["process_status"] == "completed"
    pgid = worker_pgid(sb, sid)
    out = run(sb, code, sid=sid, timeout=timeout)
    assert out["process_status"] in expect, out
    return out, sid, pgid


# ---------------------------------------------------------------- the attacks


def test_isolation_is_active(sb):
    facts = sb.facts
    assert facts["network_isolated"], facts  # this machine allows namespaces: they must be in use
    if os.geteuid() == 0:
        assert facts["mode"] == "root" and facts["uid_per_worker"] and facts["pid_namespace"]


def test_infinite_loop(sb):
    t0 = time.time()
    out, sid, pgid = hostile(sb, "while True:\n    pass", timeout=1, expect=("timeout",))
    assert out == {
        "process_status": "timeout",
        "stdout": "",
        "stderr": "Execution timed out after 1 seconds\n",
        "new_session_created": True,
    }
    assert time.time() - t0 < 5
    assert_clean(sb, sid, pgid)


def test_fork_bomb(sb):
    code = (
        "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
        "    except OSError:\n        pass"
    )
    out, sid, pgid = hostile(sb, code, timeout=2)
    assert_clean(sb, sid, pgid)


def test_memory_bomb(sb):
    out, sid, pgid = hostile(sb, "x = bytearray(8 * 1024**3)")
    assert out["process_status"] == "error" and "MemoryError" in out["stdout"]
    out = run(sb, "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024**2))", sid=sid, timeout=5)
    assert out["process_status"] == "error" and "MemoryError" in out["stdout"], out
    out = run(sb, "del blocks\nprint('freed')", sid=sid)
    assert out["stdout"] == "freed\n"
    assert_clean(sb, sid, pgid)


def test_hundred_megabytes_of_output(sb):
    out, sid, pgid = hostile(
        sb, "for _ in range(100):\n    print('x' * 1_000_000)", timeout=20, expect=("completed",)
    )
    assert out["stdout"] == "x" * 1000 + "<output cut>"
    out = run(sb, "import os\nfor _ in range(100):\n    os.write(1, b'y' * 1_000_000)", sid=sid, timeout=20)
    assert out["process_status"] == "completed" and len(out["stdout"]) <= 1000 + len("<output cut>")
    body = {"generated_code": "print('z' * 100_000_000)", "timeout": 20, "language": "python"}
    r = sb.client.post("/execute", json=body).json()
    assert r["process_status"] == "completed" and r["stdout"] == "z" * 1000 + "<output cut>"
    assert_clean(sb, sid, pgid)


def test_writing_outside_the_working_directory(sb, tmp_path):
    marker = uuid.uuid4().hex
    targets = [
        "/tmp/" + marker,
        "/var/tmp/" + marker,
        "/dev/shm/" + marker,
        str(REPO / marker),
        str(tmp_path / marker),
        "/" + marker,
        "../../" + marker,
    ]
    code = (
        f"import os\nopen('inside.txt', 'w').write('ok')\nprint(os.getcwd())\n"
        f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n"
        f"    except OSError as e:\n        print('refused', path, type(e).__name__)"
    )
    out, sid, pgid = hostile(sb, code, expect=("completed",))
    cwd = out["stdout"].splitlines()[0]
    session_dir = os.path.dirname(cwd)  # <session dir>/work is the cwd; home/ and tmp/ sit beside it
    assert os.path.isdir(session_dir)  # the host side of the private directory exists while the session lives
    for path in targets:
        host_path = os.path.normpath(os.path.join(cwd, path))
        assert not os.path.exists(host_path), f"sandboxed code wrote {host_path}"
        if not path.startswith("/dev/shm"):  # /dev/shm is a private tmpfs: writable, invisible outside
            assert f"refused {path}" in out["stdout"], out["stdout"]
    assert_clean(sb, sid, pgid)
    assert not os.path.exists(session_dir), "the private working directory was not removed"


def test_reading_server_environment_files_and_shadow(sb, tmp_path):
    secret_file = tmp_path / "server-secret.txt"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    code = (
        f"import os\nprint({SECRET!r} in str(dict(os.environ)))\nprint(sorted(os.environ))\n"
        f"for path in ['/proc/{sb.pid}/environ', '/proc/{sb.pid}/cmdline', '/proc/1/environ',\n"
        f"             '/proc/{sb.pid}/cwd/pyproject.toml', {str(secret_file)!r}, '/etc/shadow']:\n"
        f"    try:\n        data = open(path, 'rb').read()\n        print('READ', path, {SECRET.encode()!r} in data)\n"
        f"    except OSError as e:\n        print('refused', path, type(e).__name__)\n"
        f"print(sum(entry.isdigit() for entry in os.listdir('/proc')))"
    )
    out, sid, pgid = hostile(sb, code, expect=("completed",))
    lines = out["stdout"].splitlines()
    assert lines[0] == "False" and SECRET not in out["stdout"]
    assert "MF_SANDBOX_TEST_SECRET" not in lines[1]
    assert f"refused {secret_file}" in out["stdout"] and "refused /etc/shadow" in out["stdout"]
    assert f"refused /proc/{sb.pid}/environ" in out["stdout"]
    if sb.facts["pid_namespace"]:
        assert int(lines[-1]) <= 4, out["stdout"]  # /proc shows only the worker's own processes
    assert_clean(sb, sid, pgid)


def test_no_network_even_to_loopback(sb):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    server_port = int(sb.url.rsplit(":", 1)[1])
    code = (
        f"import socket\nprint(socket.if_nameindex())\n"
        f"for port in ({port}, {server_port}):\n    try:\n"
        f"        socket.create_connection(('127.0.0.1', port), timeout=1).close()\n        print('CONNECTED', port)\n"
        f"    except OSError as e:\n        print('refused', port, type(e).__name__)"
    )
    try:
        out, sid, pgid = hostile(sb, code, expect=("completed",))
    finally:
        stop.set()
        thread.join(2)
        listener.close()
    assert "CONNECTED" not in out["stdout"] and not accepted, out["stdout"]
    assert out["stdout"].splitlines()[0] == "[(1, 'lo')]"
    assert_clean(sb, sid, pgid)


def test_killing_parent_group_and_everyone(sb):
    for code in (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')",
        "import os\nos.kill(-1, 9)",
        "import os\nos.killpg(0, 9)",
        "import os\nos.kill(1, 9)\nos.kill(os.getpid(), 9)",
    ):
        out, sid, pgid = hostile(sb, code, expect=("completed", "error"))
        if out["process_status"] == "error":  # refused (EPERM, ESRCH), or the worker took itself down
            assert out["stdout"].startswith("Traceback") or (
                "worker died" in out["stderr"] and out["new_session_created"] is True
            ), out
        assert_clean(sb, sid, pgid)


def test_closing_stdout_and_descriptors(sb):
    out, sid, pgid = hostile(sb, "import sys\nsys.stdout.close()\nprint('after')")
    assert "ValueError" in out["stdout"] or "ValueError" in out["stderr"] or out["process_status"] == "error"
    out = run(sb, "import os\nos.close(1)\nos.close(2)\nprint('python-level output still works')", sid=sid)
    assert out["stdout"] == "python-level output still works\n"
    assert_clean(sb, sid, pgid)
    out, sid, pgid = hostile(
        sb,
        "import os\nfor fd in range(256):\n    try:\n        os.close(fd)\n    except OSError:\n        pass",
        expect=("error",),
    )
    assert "worker died" in out["stderr"]
    assert_clean(sb, sid, pgid)


def test_exiting(sb):
    for code, status in (
        ("import sys\nsys.exit(3)", "error"),
        ("raise SystemExit", "error"),
        ("exit()", "completed"),
        ("quit()", "completed"),
        ("import os\nos._exit(0)", "error"),
    ):
        out, sid, pgid = hostile(sb, code, expect=(status,))
        assert_clean(sb, sid, pgid)


def test_deep_recursion(sb):
    out, sid, pgid = hostile(sb, "def f(n):\n    return f(n + 1)\nf(0)")
    assert out["stdout"].startswith("Traceback") and out["stdout"].endswith("<output cut>")  # IPython's too
    out = run(sb, "f(0)", sid=sid, max_output_characters=200_000)
    assert out["stdout"].endswith("RecursionError: maximum recursion depth exceeded\n")
    assert_clean(sb, sid, pgid)
    code = "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)"
    out, sid, pgid = hostile(sb, code, timeout=1)  # Python frames live on the heap: it runs until the timeout
    assert out["process_status"] == "timeout"
    assert_clean(sb, sid, pgid)
    code = "import sys, json\nsys.setrecursionlimit(10**8)\njson.loads('[' * 10**7)"
    out, sid, pgid = hostile(sb, code, timeout=5)  # a C stack overflow: the worker dies with SIGSEGV
    assert out["stderr"].startswith("The execution worker died") and out["new_session_created"] is True
    assert_clean(sb, sid, pgid)


def test_binary_garbage(sb):
    code = (
        "import os, sys\nsys.stdout.buffer.write(os.urandom(100_000))\nprint('\\udcff\\x00\\x1b[31m')\n"
        "os.write(1, os.urandom(10_000))"
    )
    out, sid, pgid = hostile(sb, code, expect=("completed",))
    assert len(out["stdout"]) <= 1000 + len("<output cut>")
    # garbage written straight into the worker's answer channel: the server must not believe it
    out = run(
        sb,
        "import os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, b'\\xff\\xfe{garbage\\n')\n"
        "    except OSError:\n        pass",
        sid=sid,
    )
    assert out["process_status"] in ("completed", "error")
    assert_clean(sb, sid, pgid)


def test_huge_and_malformed_requests(sb):
    c = sb.client
    big = json.dumps({"generated_code": "#" * (11 << 20), "timeout": 1, "language": "ipython"})
    assert c.post("/execute", content=big, headers={"X-Session-ID": "big"}).status_code == 413

    def chunks():
        for _ in range(12):
            yield b"x" * (1 << 20)

    assert c.post("/execute", content=chunks(), headers={"X-Session-ID": "big"}).status_code == 413
    bad = [
        b"",
        b"{",
        b"[1, 2]",
        b"\xff\xfe\x00",
        b"null",
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"timeout": 1}).encode(),
        json.dumps({"generated_code": "1"}).encode(),
        json.dumps({"generated_code": "1", "timeout": "10"}).encode(),
        json.dumps({"generated_code": "1", "timeout": -1}).encode(),
        json.dumps({"generated_code": "1", "timeout": 1, "max_output_characters": -5}).encode(),
        json.dumps({"generated_code": "1", "timeout": 1, "traceback_verbosity": "Loud"}).encode(),
        json.dumps({"generated_code": 5, "timeout": 1}).encode(),
    ]
    for payload in bad:
        r = c.post(
            "/execute", content=payload, headers={"X-Session-ID": "bad", "Content-Type": "application/json"}
        )
        assert r.status_code == 400 and "error" in r.json(), (payload[:40], r.status_code, r.text[:200])
    host, port = sb.url.rsplit("/", 1)[1].split(":")
    for head in (
        b"Content-Length: 99999999999\r\n",
        b"Content-Length: -5\r\n",
        b"Transfer-Encoding: chunked\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=10) as raw:  # a client that lies
            raw.sendall(
                b"POST /execute HTTP/1.1\r\nHost: x\r\nX-Session-ID: bad\r\n" + head + b"\r\n" + b"1" * 100
            )
            raw.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := raw.recv(65536):
                reply += chunk
        assert reply == b"" or reply.split(b" ")[1] in (b"400", b"413"), reply[:100]
    assert c.get("/health").json()["status"] == "healthy"
    assert not sandbox_processes(sb)


def test_fifty_concurrent_requests(sb):
    async def go():
        async with httpx.AsyncClient(base_url=sb.url, timeout=60) as client:

            async def one(i):
                body = {
                    "generated_code": f"import time\ntime.sleep(0.3)\nprint({i} * 2)",
                    "timeout": 10,
                    "language": "ipython",
                    "max_output_characters": 1000,
                }
                r = await client.post("/execute", content=json.dumps(body), headers={"X-Session-ID": f"c{i}"})
                return i, r.status_code, r.json()

            return await asyncio.gather(*(one(i) for i in range(50)))

    results = asyncio.run(go())
    done = [(i, out) for i, status, out in results if status == 200]
    refused = [out for _, status, out in results if status == 503]
    assert len(done) + len(refused) == 50
    assert len(done) >= 4 + 20 - 4 and refused, (len(done), len(refused))  # 4 running + 20 queued admitted
    for i, out in done:
        assert out["process_status"] == "completed" and out["stdout"] == f"{i * 2}\n"
    assert all("busy" in out["error"] for out in refused)
    for i in range(50):
        delete(sb, f"c{i}")
    assert_clean(sb, f"after-{uuid.uuid4()}")


def test_limits_are_applied(sb):
    code = (
        "import resource, os\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, "
        "resource.getrlimit(resource.RLIMIT_NPROC)[0], resource.getrlimit(resource.RLIMIT_NOFILE)[0], "
        "resource.getrlimit(resource.RLIMIT_FSIZE)[0] >> 20, resource.getrlimit(resource.RLIMIT_CPU)[0])\n"
        "try:\n    open('big', 'wb').write(b'0' * (9 << 20))\nexcept OSError as e:\n    print('fsize', e.errno)\n"
        "files = []\ntry:\n    for i in range(200):\n        files.append(open(f'f{i}', 'w'))\n"
        "except OSError as e:\n    print('nofile', e.errno)\nfor f in files:\n    f.close()\n"
        "try:\n    for i in range(6):\n        open(f'chunk{i}', 'wb').write(b'0' * (7 << 20))\n"
        "except OSError as e:\n    print('disk', e.errno)\nprint(os.getuid() >= 0, os.getpid())"
    )
    out, sid, pgid = hostile(sb, code, expect=("completed",))
    lines = out["stdout"].splitlines()
    assert lines[0] == "1024 32 128 8 30"
    assert "fsize 27" in lines  # EFBIG
    assert "nofile 24" in lines  # EMFILE
    if sb.facts["mount_namespace"]:
        assert "disk 28" in lines  # ENOSPC: the private directory is a 32 MiB tmpfs
        assert lines[-1] == "True 2"  # PID 2 in its own PID namespace (PID 1 is the worker's init)
    assert_clean(sb, sid, pgid)


def test_compose_service_is_locked_down():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    svc = compose["services"]["sandbox"]
    assert svc["read_only"] is True
    assert svc["network_mode"] == "none"
    assert int(svc["pids_limit"]) > 0 and svc["mem_limit"]
    assert any(str(t).startswith("/tmp") for t in svc["tmpfs"])
    assert str(svc["user"]).split(":")[0] not in ("0", "root")
    assert "no-new-privileges:true" in svc.get("security_opt", [])
    dockerfile = (REPO / "infra" / "sandbox.Dockerfile").read_text()
    assert "USER " in dockerfile and "mathforge" in dockerfile and "sandbox" in dockerfile


def test_server_memory_stayed_bounded(sb):
    """Runs last: after every attack above, the server process grew by less than 64 MiB."""
    rss = psutil.Process(sb.pid).memory_info().rss
    print(f"sandbox server RSS: {sb.rss_start >> 20} MiB at start, {rss >> 20} MiB after the attacks")
    assert rss - sb.rss_start < 64 << 20, (sb.rss_start >> 20, rss >> 20)
    assert sb.client.get("/health").json()["live_workers"] == 0
