"""Isolation primitives for sandbox workers: namespaces, mounts, resource limits, privilege drop.

Standard library only: this module also runs inside the sandboxed interpreter (`worker.py` imports it
by path), which may be a different Python from the server's.

What a worker can get, strongest first:
- ``root``: the server runs as root. Each worker gets new network, mount and PID namespaces, and the
  code runs under a uid/gid of its own (one per worker slot), so RLIMIT_NPROC counts only that worker's
  processes and the code can neither signal nor read anything of the server's.
- ``userns``: the server is not root but may create user namespaces. The same namespaces, inside a user
  namespace that maps only the server's uid; a second, nested user namespace takes away the code's
  power over the mounts and the network namespace that were set up for it.
- ``uid``: root, but namespaces are refused (no CAP_SYS_ADMIN): own uid per worker slot, no namespaces.
- ``none``: no namespaces (e.g. a container with the default seccomp profile). Process group, rlimits,
  empty environment and private directory still apply; there is NO network isolation from here, which
  the server reports loudly. Inside the production container, ``--network none`` provides it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_MOVE = 8192
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# statvfs f_flag bits -> mount flags that must be kept when remounting (the kernel refuses to clear
# "locked" flags inherited from a more privileged mount namespace).
_ST_TO_MS = {
    1: MS_RDONLY,
    2: MS_NOSUID,
    4: MS_NODEV,
    8: MS_NOEXEC,
    1024: MS_NOATIME,
    2048: MS_NODIRATIME,
    4096: MS_RELATIME,
}

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # the C library is already loaded into this process
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_lib().unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    lib = _lib()
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _check(lib.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def prctl(option: int, arg2: int = 0) -> None:
    lib = _lib()
    lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _check(lib.prctl(option, arg2, 0, 0, 0), f"prctl({option})")


def make_undumpable() -> None:
    """/proc/<pid>/{environ,mem,fd,...} of this process become root-only (also for same-uid processes)."""
    try:
        prctl(PR_SET_DUMPABLE, 0)
    except OSError:
        pass


# ---------------------------------------------------------------- namespaces


def ns_flags(mode: str) -> int:
    if mode == "root":
        return CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID
    if mode == "userns":
        return CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID
    return 0


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def map_self(inner_uid: int, inner_gid: int, outer_uid: int, outer_gid: int) -> None:
    """In a fresh user namespace: map one inner uid/gid to this process's outer ones."""
    try:
        _write("/proc/self/setgroups", "deny")
    except FileNotFoundError:
        pass
    _write("/proc/self/uid_map", f"{inner_uid} {outer_uid} 1\n")
    _write("/proc/self/gid_map", f"{inner_gid} {outer_gid} 1\n")


def enter_namespaces(mode: str) -> None:
    """Called by the worker's first process (before it forks): new namespaces for everything below it."""
    flags = ns_flags(mode)
    if not flags:
        return
    uid, gid = os.geteuid(), os.getegid()
    unshare(flags)
    if mode == "userns":
        map_self(0, 0, uid, gid)


def loopback_up() -> None:
    """Bring up `lo` in a fresh network namespace: the code gets a loopback of its own and nothing else."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                # octal escapes (\040 for a space, ...)
                points.append(fields[4].encode().decode("unicode_escape"))
    return points


def _keep_flags(path: str) -> int:
    flags = 0
    try:
        st = os.statvfs(path).f_flag
    except OSError:
        return 0
    for bit, ms in _ST_TO_MS.items():
        if st & bit:
            flags |= ms
    return flags


def blocked_ancestor(path: str) -> str | None:
    """The highest ancestor directory of `path` that others (the sandbox uid) cannot traverse."""
    parts = path.strip("/").split("/")
    cur = ""
    for part in parts[:-1] or parts:
        cur += "/" + part
        try:
            if not os.stat(cur).st_mode & 0o001:
                return cur
        except OSError:
            return None
    return None


def interpreter_paths() -> list[str]:
    """Directories the sandboxed interpreter needs to read: its prefixes and sys.path entries."""
    import sys

    want = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))}
    want |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    out: list[str] = []
    for p in sorted(want, key=len):
        if not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def expose(paths: list[str], staging: str) -> list[str]:
    """Make `paths` reachable for an unprivileged uid when an ancestor directory is closed to it (a
    Python installed under /root, say): the closed ancestor is covered by an empty tmpfs (hiding the
    rest of it) in which only these paths appear, bind-mounted read-only. Root, in a private mount
    namespace, before dropping privileges. Returns warnings."""
    warnings: list[str] = []
    covered: set[str] = set()
    for i, path in enumerate(paths):
        top = blocked_ancestor(path)
        if top is None:
            continue
        stage = os.path.join(staging, f".expose-{i}")
        try:
            os.mkdir(stage, 0o700)
            mount(path, stage, None, MS_BIND | MS_REC)
            if top not in covered:
                mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
                covered.add(top)
            os.makedirs(path, 0o755, exist_ok=True)
            mount(stage, path, None, MS_MOVE)
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _keep_flags(path))
            os.rmdir(stage)
        except OSError as exc:
            warnings.append(f"could not expose {path} to the sandbox uid: {exc}")
    for top in covered:
        try:
            mount(None, top, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError as exc:
            warnings.append(f"could not make {top} read-only: {exc}")
    return warnings


def setup_mounts(
    workdir: str,
    *,
    disk_bytes: int,
    uid: int,
    gid: int,
    new_proc: bool,
    shm_bytes: int = 16 << 20,
    expose_paths: list[str] | None = None,
) -> list[str]:
    """In the worker's own mount namespace: everything read-only except a fresh size-limited tmpfs at
    `workdir` (owned by uid/gid) and a small private /dev/shm; a /proc of the new PID namespace;
    `expose_paths` made reachable (see `expose`). Returns warnings (what could not be done); raises if
    the working directory cannot be set up."""
    warnings: list[str] = []
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here propagates back to the host
    for point in sorted(set(_mount_points()), key=len):
        if point == "/proc" or point.startswith("/proc/"):
            continue
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _keep_flags(point))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES) or point == "/":
                warnings.append(f"could not make {point} read-only: {exc.strerror}")
    if new_proc:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as exc:
            warnings.append(f"could not mount a private /proc: {exc.strerror}")
    mount(
        "tmpfs",
        workdir,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={max(disk_bytes, 1 << 20)},nr_inodes=16384,mode=0700,uid={uid},gid={gid}",
    )
    if expose_paths:
        warnings += expose(expose_paths, workdir)
    if os.path.isdir("/dev/shm"):
        try:
            mount(
                "tmpfs",
                "/dev/shm",
                "tmpfs",
                MS_NOSUID | MS_NODEV,
                f"size={shm_bytes},nr_inodes=1024,mode=1777",
            )
        except OSError as exc:
            warnings.append(f"could not mount a private /dev/shm: {exc.strerror}")
    return warnings


# ---------------------------------------------------------------- privileges and limits


def drop_privileges(mode: str, uid: int, gid: int) -> None:
    """root: become the slot's uid/gid (all capabilities go). userns: a nested user namespace, so the
    code has no power over the namespaces set up for it. Both: no_new_privs (setuid binaries stay inert)."""
    if mode in ("root", "uid"):
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    elif mode == "userns":
        unshare(CLONE_NEWUSER)
        map_self(1000, 1000, 0, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_rlimits(*, memory: int, cpu: int, nproc: int, fsize: int, nofile: int) -> None:
    """Hard and soft limits alike, so the code cannot raise them again."""

    def lim(kind: int, value: int) -> None:
        try:
            soft, hard = resource.getrlimit(kind)
            if hard != resource.RLIM_INFINITY and value > hard:
                value = hard
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass

    if memory > 0:
        lim(resource.RLIMIT_AS, memory)
        lim(resource.RLIMIT_DATA, memory)
    if cpu > 0:
        lim(resource.RLIMIT_CPU, cpu)
    if nproc > 0:
        lim(resource.RLIMIT_NPROC, nproc)
    if fsize > 0:
        lim(resource.RLIMIT_FSIZE, fsize)
    if nofile > 0:
        lim(resource.RLIMIT_NOFILE, nofile)
    lim(resource.RLIMIT_CORE, 0)
    for name in ("RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE"):
        if hasattr(resource, name):
            lim(getattr(resource, name), 0)


def count_user_processes(uid: int) -> int:
    """Processes (threads count for RLIMIT_NPROC too, but this is a floor) whose real uid is `uid`."""
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def be_nice(niceness: int) -> None:
    try:
        if niceness:
            os.nice(niceness)
    except OSError:
        pass
    try:  # the kernel's OOM killer takes sandbox processes before the server
        _write("/proc/self/oom_score_adj", "1000")
    except OSError:
        pass


def kill_quietly(pid: int, sig: int = signal.SIGKILL, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
