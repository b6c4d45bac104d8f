"""The content-addressed artifact store.

Layout under the root (``$MATHFORGE_ARTIFACTS``, else ``$MATHFORGE_HOME/artifacts``, ``MATHFORGE_HOME``
defaulting to ``./.mathforge``); the root may be a shared mount (it needs working ``flock``; on NFS that is
the default NLM locking)::

    objects/<digest>/        one published artifact: its files + manifest.json (never modified)
    keys/<recipe key>.json   recipe key -> digest (replaced atomically)
    locks/<recipe key>.lock  flock held by the one producer building that key
    locks/.gc.lock           shared by publishers, exclusive for gc
    tmp/<name>/ + <name>.lock   build directories, each flock-ed by its live producer
    trash/                   damaged objects moved aside before removal

Publishing is atomic: the producer builds into ``tmp/<name>/`` (same filesystem), hashes, writes
``manifest.json`` and renames the directory to ``objects/<digest>``, then points ``keys/<key>.json`` at it
(temp file + ``os.replace``). Readers therefore never see a partial object. A producer that dies
releases its flocks with its process, so the key is never blocked; its half-written ``tmp/`` directory is
removed by the next producer of that key or by ``gc``.

No Prefect here: the store is plain Python, used the same with and without Prefect.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from artifacts.keys import (
    MANIFEST_NAME,
    ArtifactRef,
    canonicalize,
    content_digest,
    digest_of,
    hash_file,
    hash_files,
    is_hex_digest,
    key_of_recipe,
    list_files,
    recipe_document,
    recipe_key,
)
from mathforge.errors import UserError

log = logging.getLogger("mathforge.artifacts")

MANIFEST_FORMAT = 1
DEFAULT_FULL_HASH_MAX_BYTES = 64 * 1024 * 1024
WAIT_LOG_EVERY_S = 60.0

Progress = Callable[[str], Any]


class ArtifactMissing(UserError, LookupError):
    """An artifact (by digest or recipe key) that is not currently valid in the store."""


class AmbiguousPrefix(UserError, LookupError):
    """A digest/key prefix that matches more than one artifact."""


@dataclass
class Problem:
    """One thing wrong with a stored object."""

    digest: str
    message: str

    def __str__(self) -> str:
        return f"{self.digest[:12]}: {self.message}"


@dataclass
class ArtifactInfo:
    """One row of `ArtifactStore.ls()`."""

    digest: str
    kind: str
    keys: list[str]
    total_size: int
    file_count: int
    created: str | None
    build_seconds: float | None
    path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcReport:
    """What `ArtifactStore.gc()` removed (or, with dry_run, would remove)."""

    dry_run: bool
    tmp: list[str] = field(default_factory=list)
    trash: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in use by a live producer
    bytes_freed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- roots


def store_root() -> Path:
    """Where the default store lives: $MATHFORGE_ARTIFACTS, else $MATHFORGE_HOME/artifacts (MATHFORGE_HOME
    defaults to ./.mathforge). Read at call time, resolved to an absolute path."""
    explicit = os.environ.get("MATHFORGE_ARTIFACTS")
    if explicit:
        return Path(explicit).expanduser().resolve()
    home = os.environ.get("MATHFORGE_HOME") or ".mathforge"
    return (Path(home).expanduser() / "artifacts").resolve()


def default_store() -> ArtifactStore:
    """The store at `store_root()` (a new, cheap handle each call: the environment may change)."""
    return ArtifactStore(store_root())


# ---------------------------------------------------------------- locking

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    # flock conflicts between open file descriptions, so threads are excluded on local filesystems, but
    # NFS emulates flock with per-process POSIX locks: a per-path thread lock makes threads safe everywhere.
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(str(path), threading.Lock())


class _FileLock:
    """An fcntl.flock on a lock file. The kernel drops it when the holder's process dies.

    After locking, the path is checked to still name the locked inode (gc may unlink lock files), so two
    holders can never lock different inodes of one path."""

    def __init__(self, path: Path, *, shared: bool = False, threads: bool = True):
        self.path = path
        self.shared = shared
        self.fd: int | None = None
        self._tlock = _thread_lock(path) if threads and not shared else None

    def acquire(self, blocking: bool = True, on_wait: Callable[[float, bool], None] | None = None) -> bool:
        """Take the lock; with `blocking=False` return False at once when it is held. While waiting,
        `on_wait(elapsed_s, first)` is called before each poll."""
        waiter = _Waiter(on_wait)
        if self._tlock is not None:
            while not self._tlock.acquire(blocking=False):
                if not blocking:
                    return False
                waiter.wait()
        ok = False
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    while True:
                        try:
                            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            if not blocking:
                                return False
                            waiter.wait()
                    try:
                        st = os.stat(self.path)
                    except FileNotFoundError:
                        continue  # unlinked by gc meanwhile: lock the new file
                    fst = os.fstat(fd)
                    if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                        self.fd, fd, ok = fd, -1, True
                        return True
                finally:
                    if fd >= 0:
                        os.close(fd)
        finally:
            if not ok and self._tlock is not None:
                self._tlock.release()

    def write_holder(self, info: Mapping[str, Any]) -> None:
        assert self.fd is not None
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(dict(info)).encode(), 0)

    def release(self, *, unlink: bool = False) -> None:
        if self.fd is None:
            return
        try:
            if unlink:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            os.close(self.fd)  # closing the last descriptor drops the flock
        finally:
            self.fd = None
            if self._tlock is not None:
                self._tlock.release()

    def __enter__(self) -> _FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Waiter:
    def __init__(self, on_wait: Callable[[float, bool], None] | None):
        self.on_wait = on_wait
        self.start = time.monotonic()
        self.delay = 0.02
        self.first = True

    def wait(self) -> None:
        if self.on_wait is not None:
            self.on_wait(time.monotonic() - self.start, self.first)
        self.first = False
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 0.25)


def _holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder"


# ---------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


_PRODUCER: dict[str, str] | None = None


def producer_versions() -> dict[str, str]:
    """Versions of what produced an artifact (from package metadata: torch is not imported for this)."""
    global _PRODUCER
    if _PRODUCER is None:
        versions = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
        for dist in ("mathforge", "torch", "prefect", "transformers", "safetensors"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[dist] = importlib.metadata.version(dist)
        _PRODUCER = versions
    versions = dict(_PRODUCER)
    torch = sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "version", None), "cuda", None):
        versions["cuda"] = str(torch.version.cuda)
    versions["host"] = socket.gethostname()
    return versions


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _materialize_symlinks(root: Path) -> None:
    """Replace symlinks in a build directory by copies of their targets (artifacts are self-contained)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                continue
            target = p.resolve()
            if not target.exists():
                raise ValueError(f"build output {p.relative_to(root)} is a dangling symlink")
            p.unlink()
            if target.is_dir():
                shutil.copytree(target, p, symlinks=False)
            else:
                shutil.copy2(target, p)
        # os.walk does not descend into directory symlinks; copies made above are walked next


def _ref_of(value: ArtifactRef | str) -> str:
    digest = value.digest if isinstance(value, ArtifactRef) else str(value)
    if not is_hex_digest(digest):
        raise ValueError(f"{digest!r} is not a sha256 content digest")
    return digest


# ---------------------------------------------------------------- the store


class ArtifactStore:
    """A content-addressed artifact store rooted at `root` (see the module docstring for the layout).

    Validation rule on every hit (`check`): the manifest parses and names this digest; the set of files
    equals the manifest's (nothing missing, nothing extra) and every size matches. Then content:
    artifacts of at most `full_hash_max_bytes` in total (default 64 MiB) are re-hashed completely on every
    hit; larger ones re-hash each file whose mtime differs from the one recorded at publish time. Within one
    process a validation is remembered for the exact (inode, size, mtime, ctime) of every file (only when
    those timestamps are more than 2 s older than the validation), so a repeated hit on unchanged files
    costs only `stat` calls — any later write changes ctime and forces a re-hash.
    `verify()` always re-hashes everything. A damaged or missing object is a miss: it is moved aside and
    rebuilt, never returned.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, full_hash_max_bytes: int | None = None):
        self.root = Path(root).expanduser().resolve() if root is not None else store_root()
        if full_hash_max_bytes is None:
            full_hash_max_bytes = int(
                os.environ.get("MATHFORGE_ARTIFACT_FULL_HASH_BYTES", DEFAULT_FULL_HASH_MAX_BYTES)
            )
        self.full_hash_max_bytes = full_hash_max_bytes
        self.objects_dir = self.root / "objects"
        self.keys_dir = self.root / "keys"
        self.locks_dir = self.root / "locks"
        self.tmp_dir = self.root / "tmp"
        self.trash_dir = self.root / "trash"

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def _ensure_dirs(self) -> None:
        for d in (self.objects_dir, self.keys_dir, self.locks_dir, self.tmp_dir, self.trash_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ naming

    def path(self, ref: ArtifactRef | str) -> Path:
        """Directory of an artifact in this store (computed; not validated — use `resolve` first)."""
        return self.objects_dir / _ref_of(ref)

    def manifest(self, ref: ArtifactRef | str) -> dict[str, Any]:
        """The parsed manifest.json of an object (raises ArtifactMissing when absent or unreadable)."""
        digest = _ref_of(ref)
        try:
            return json.loads((self.objects_dir / digest / MANIFEST_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactMissing(
                f"artifact {digest[:12]}: no readable manifest in {self.root} ({exc})"
            ) from exc

    def key_record(self, key: str) -> dict[str, Any] | None:
        """The mapping record keys/<key>.json, or None when there is none (or it is unreadable)."""
        try:
            rec = json.loads((self.keys_dir / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or not is_hex_digest(str(rec.get("digest", ""))):
            return None
        return rec

    def key_digest(self, key: str) -> str | None:
        """The digest a recipe key currently maps to (not validated), or None."""
        rec = self.key_record(key)
        return rec["digest"] if rec else None

    # ------------------------------------------------------------ validation

    _memo: dict[str, tuple] = {}
    _memo_lock = threading.Lock()

    def check(self, ref: ArtifactRef | str, *, full: bool = False) -> list[str]:
        """Problems with one object ([] = valid), by the rule in the class docstring; `full` re-hashes all."""
        digest = _ref_of(ref)
        d = self.objects_dir / digest
        if not d.is_dir():
            return ["missing"]
        try:
            manifest = json.loads((d / MANIFEST_NAME).read_text())
            files = {f["path"]: f for f in manifest["files"]}
            if manifest.get("digest") != digest:
                return [f"manifest names digest {str(manifest.get('digest'))[:12]}, not this one"]
            if digest_of({p: f["sha256"] for p, f in files.items()}) != digest:
                return ["manifest file list does not hash to the digest"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return [f"manifest.json unreadable: {exc}"]
        try:
            present = set(list_files(d))
        except (OSError, ValueError) as exc:
            return [str(exc)]
        problems = [f"missing file {p}" for p in sorted(set(files) - present)]
        problems += [f"unexpected file {p}" for p in sorted(present - set(files))]
        if problems:
            return problems
        stats: dict[str, os.stat_result] = {}
        for rel, f in files.items():
            try:
                st = os.stat(d / rel)
            except OSError as exc:
                problems.append(f"{rel}: {exc}")
                continue
            stats[rel] = st
            if st.st_size != f["size"]:
                problems.append(f"{rel}: size {st.st_size} != recorded {f['size']}")
        if problems:
            return problems
        signature = tuple(
            sorted((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for rel, st in stats.items())
        )
        memo_key = str(d)
        if not full:
            with self._memo_lock:
                if self._memo.get(memo_key) == signature:
                    return []
        total = sum(f["size"] for f in files.values())
        if full or total <= self.full_hash_max_bytes:
            to_hash = list(files)
        else:
            to_hash = [rel for rel, f in files.items() if stats[rel].st_mtime_ns != f.get("mtime_ns")]
        started_ns = time.time_ns()
        try:
            hashes = hash_files(d, to_hash)
        except OSError as exc:
            return [f"unreadable: {exc}"]
        problems = [
            f"{rel}: content changed (sha256 mismatch)"
            for rel in to_hash
            if hashes[rel] != files[rel]["sha256"]
        ]
        # Remember only stats that are safely in the past: a write within the same timestamp tick as this
        # validation would otherwise leave (mtime, ctime) unchanged ("racy git").
        newest = max((st.st_ctime_ns for st in stats.values()), default=0)
        if not problems and newest < started_ns - 2_000_000_000:
            with self._memo_lock:
                if len(self._memo) > 10000:
                    self._memo.clear()
                self._memo[memo_key] = signature
        return problems

    def lookup(
        self, key: str, *, progress: Progress | None = None, quiet: bool = False
    ) -> ArtifactRef | None:
        """A valid ref for a recipe key, or None (no mapping, or its object is missing/damaged: logged)."""
        rec = self.key_record(key)
        if rec is None:
            return None
        problems = self.check(rec["digest"])
        if problems and quiet:
            return None
        if problems:
            msg = (
                f"artifact {rec.get('kind', '?')} {rec['digest'][:12]} (key {key[:12]}) is not valid: "
                + "; ".join(problems[:5])
            )
            (progress or log.warning)(msg)
            return None
        return ArtifactRef(
            kind=rec.get("kind") or self._kind_of(rec["digest"]), key=key, digest=rec["digest"]
        )

    def _kind_of(self, digest: str) -> str:
        try:
            return str(self.manifest(digest).get("kind", "?"))
        except ArtifactMissing:
            return "?"

    def resolve(self, ref: ArtifactRef) -> ArtifactRef:
        """A currently valid ref: `ref` itself when its digest is valid here, else the key's current mapping
        (a rebuild may have produced other bytes); raises ArtifactMissing otherwise."""
        if not isinstance(ref, ArtifactRef):
            raise TypeError(f"resolve() takes an ArtifactRef, got {type(ref).__name__}")
        if not self.check(ref.digest):
            return ref
        digest = self.key_digest(ref.key)
        if digest and digest != ref.digest and not self.check(digest):
            return ArtifactRef(kind=ref.kind, key=ref.key, digest=digest)
        raise ArtifactMissing(
            f"artifact {ref.kind} {ref.digest[:12]} (recipe key {ref.key[:12]}) is missing or damaged in "
            f"the store at {self.root}; re-run the step that produces it"
        )

    def recipe_key(
        self,
        kind: str,
        version: int,
        params: Mapping[str, Any],
        inputs: Mapping[str, ArtifactRef] | None = None,
    ) -> str:
        """The recipe key `get_or_build` would use (inputs resolved to their current digests)."""
        digests = {name: self.resolve(ref).digest for name, ref in (inputs or {}).items()}
        return recipe_key(kind, version, params, digests)

    # ------------------------------------------------------------ producing

    def _key_lock(self, key: str) -> _FileLock:
        return _FileLock(self.locks_dir / f"{key}.lock")

    def _gc_lock(self, shared: bool) -> _FileLock:
        return _FileLock(self.locks_dir / ".gc.lock", shared=shared, threads=False)

    @contextlib.contextmanager
    def _producing(self, kind: str, key: str, say: Progress) -> Iterator[None]:
        """Hold the key's lock; log while another producer holds it."""
        self._ensure_dirs()
        lock = self._key_lock(key)
        next_log = [0.0]

        def on_wait(elapsed: float, first: bool) -> None:
            if first:
                say(
                    f"waiting for another producer of {kind} {key[:12]} "
                    f"({_read_holder(lock.path)}); will reuse its result"
                )
                next_log[0] = WAIT_LOG_EVERY_S
            elif elapsed >= next_log[0]:
                say(f"still waiting for the producer of {kind} {key[:12]} ({elapsed:.0f} s)")
                next_log[0] += WAIT_LOG_EVERY_S

        lock.acquire(on_wait=on_wait)
        try:
            lock.write_holder(_holder_info())
            yield
        finally:
            lock.release()

    def get_or_build(
        self,
        kind: str,
        version: int,
        params: Mapping[str, Any],
        inputs: Mapping[str, ArtifactRef] | None,
        build: Callable[[Path], Any],
        *,
        progress: Progress | None = None,
    ) -> ArtifactRef:
        """The artifact for this recipe: reused when a valid one exists, else built once.

        `build(out)` writes the artifact's files into the empty directory `out` (inside the store root); if
        it returns a dict, that is recorded as the manifest's "meta". Concurrent producers of one key
        (threads, processes, hosts sharing the root) build once: the others wait on the key's flock, then
        re-check and reuse. `progress(msg)` receives human-readable status lines.
        """
        say = progress or log.info
        resolved = {name: self.resolve(ref) for name, ref in (inputs or {}).items()}
        doc = recipe_document(kind, version, params, {n: r.digest for n, r in resolved.items()})
        key = key_of_recipe(doc)
        hit = self.lookup(key, progress=say)
        if hit is not None:
            say(f"reusing stored {kind} {hit.digest[:12]} (key {key[:12]})")
            return hit
        with self._producing(kind, key, say):
            hit = self.lookup(key, quiet=True)
            if hit is not None:
                say(f"reusing {kind} {hit.digest[:12]} built by another producer")
                return hit
            self._discard_invalid_mapping(key)
            self._clean_stale_tmp(prefix=key[:16])
            return self._build_and_publish(kind, key, doc, resolved, build, say)

    def put_dir(
        self,
        kind: str,
        src_dir: str | os.PathLike,
        *,
        params: Mapping[str, Any] | None = None,
        version: int = 0,
        inputs: Mapping[str, ArtifactRef] | None = None,
        progress: Progress | None = None,
    ) -> ArtifactRef:
        """Copy a directory into the store (symlinks followed; a top-level manifest.json is ignored).

        Its recipe key is made of `kind`, `version`, `params` plus the source's content digest, so the same
        bytes always give the same key and changed bytes a new one. No copy is made when the content is
        already stored."""
        say = progress or log.info
        src = Path(src_dir)
        if not src.is_dir():
            raise ArtifactMissing(f"{src} is not a directory")
        params = dict(params or {})
        if "content_digest" in params:
            raise ValueError("put_dir: 'content_digest' is reserved")
        say(f"hashing {src}")
        src_digest = content_digest(src, follow_symlinks=True)
        params["content_digest"] = src_digest
        resolved = {name: self.resolve(ref) for name, ref in (inputs or {}).items()}
        digests = {n: r.digest for n, r in resolved.items()}
        doc = recipe_document(kind, version, params, digests)
        key = key_of_recipe(doc)
        hit = self.lookup(key, progress=say)
        if hit is not None:
            return hit
        with self._producing(kind, key, say):
            hit = self.lookup(key, quiet=True)
            if hit is not None:
                return hit
            self._discard_invalid_mapping(key)
            with self._gc_lock(shared=True):  # gc cannot remove the object between check and mapping
                if not self.check(src_digest):
                    say(f"{kind} content {src_digest[:12]} is already stored: no copy")
                    self._write_key(key, src_digest, kind, doc, resolved)
                    return ArtifactRef(kind=kind, key=key, digest=src_digest)

            def copy(out: Path) -> None:
                def ignore(d: str, names: list[str]) -> list[str]:
                    return [MANIFEST_NAME] if Path(d) == src and MANIFEST_NAME in names else []

                shutil.copytree(src, out, symlinks=False, ignore=ignore, dirs_exist_ok=True)

            return self._build_and_publish(kind, key, doc, resolved, copy, say, expect_digest=src_digest)

    def _discard_invalid_mapping(self, key: str) -> None:
        """Under the key's lock: move a damaged object that the key maps to out of the way."""
        digest = self.key_digest(key)
        if digest is None:
            return
        problems = self.check(digest)
        if problems and problems != ["missing"]:
            self._move_aside(digest, problems)

    def _move_aside(self, digest: str, problems: list[str]) -> None:
        src = self.objects_dir / digest
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        dst = self.trash_dir / f"{digest}.{int(time.time())}.{secrets.token_hex(4)}"
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return
        log.warning("moved damaged artifact %s aside (%s)", digest[:12], "; ".join(problems[:5]))
        shutil.rmtree(dst, ignore_errors=True)

    def _build_and_publish(
        self,
        kind: str,
        key: str,
        doc: dict[str, Any],
        inputs: Mapping[str, ArtifactRef],
        build: Callable[[Path], Any],
        say: Progress,
        expect_digest: str | None = None,
    ) -> ArtifactRef:
        name = f"{key[:16]}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp_lock = _FileLock(self.tmp_dir / f"{name}.lock")
        tmp_lock.acquire()
        tmp = self.tmp_dir / name
        try:
            tmp.mkdir()
            say(f"building {kind} (key {key[:12]})")
            t0 = time.monotonic()
            meta = build(tmp)
            build_s = time.monotonic() - t0
            if (tmp / MANIFEST_NAME).exists():
                raise ValueError(
                    f"the build of {kind} wrote {MANIFEST_NAME}; that name is reserved for the store"
                )
            _materialize_symlinks(tmp)
            rels = list_files(tmp)
            t1 = time.monotonic()
            hashes = hash_files(tmp, rels)
            digest = digest_of(hashes)
            if expect_digest is not None and digest != expect_digest:
                raise RuntimeError(
                    f"{kind}: the source changed while it was copied (digest {digest[:12]} != {expect_digest[:12]})"
                )
            files = []
            for rel in rels:
                st = os.stat(tmp / rel)
                files.append(
                    {"path": rel, "size": st.st_size, "sha256": hashes[rel], "mtime_ns": st.st_mtime_ns}
                )
            manifest = {
                "format": MANIFEST_FORMAT,
                "kind": kind,
                "digest": digest,
                "key": key,
                "recipe": {k: doc[k] for k in ("kind", "version", "params")},
                "inputs": {n: r.model_dump() for n, r in inputs.items()},
                "producer": producer_versions(),
                "files": files,
                "file_count": len(files),
                "total_size": sum(f["size"] for f in files),
                "created": _now(),
                "build_seconds": round(build_s, 3),
                "hash_seconds": round(time.monotonic() - t1, 3),
            }
            if isinstance(meta, Mapping):
                manifest["meta"] = canonicalize(dict(meta), "build meta")
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            with self._gc_lock(shared=True):
                self._publish_object(tmp, digest)
                self._write_key(key, digest, kind, doc, inputs)
            self._record_event("built", kind=kind, key=key, digest=digest, build_seconds=round(build_s, 3))
            say(
                f"published {kind} {digest[:12]} ({manifest['total_size']} bytes, {len(files)} files, build {build_s:.1f} s)"
            )
            return ArtifactRef(kind=kind, key=key, digest=digest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            tmp_lock.release(unlink=True)

    def _record_event(self, event: str, **fields: Any) -> None:
        """Append one line to events.jsonl: an audit trail of what was built, by whom, when."""
        line = json.dumps(
            {"event": event, "time": _now(), "pid": os.getpid(), "host": socket.gethostname(), **fields}
        )
        fd = os.open(self.root / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())  # one short O_APPEND write: lines never interleave
        finally:
            os.close(fd)

    def _publish_object(self, tmp: Path, digest: str) -> None:
        target = self.objects_dir / digest
        for _ in range(5):
            try:
                os.rename(tmp, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            problems = self.check(digest)
            if not problems:
                shutil.rmtree(tmp, ignore_errors=True)  # identical content already published: reuse it
                return
            if problems != ["missing"]:
                self._move_aside(digest, problems)
        raise RuntimeError(f"could not publish {digest[:12]} into {self.objects_dir}")

    def _write_key(
        self, key: str, digest: str, kind: str, doc: Mapping[str, Any], inputs: Mapping[str, ArtifactRef]
    ) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "key": key,
            "digest": digest,
            "kind": kind,
            "recipe": {k: doc[k] for k in ("kind", "version", "params")},
            "inputs": {n: r.model_dump() for n, r in inputs.items()},
            "updated": _now(),
        }
        tmp = self.keys_dir / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, self.keys_dir / f"{key}.json")

    def _clean_stale_tmp(
        self, prefix: str = "", dry_run: bool = False, report: GcReport | None = None
    ) -> None:
        """Remove tmp/ build dirs whose producer is gone (their lock is free)."""
        if not self.tmp_dir.is_dir():
            return
        for entry in sorted(self.tmp_dir.iterdir()):
            if not entry.name.startswith(prefix) or entry.name.endswith(".lock"):
                continue
            lock = _FileLock(self.tmp_dir / f"{entry.name}.lock")
            if not lock.acquire(blocking=False):
                if report is not None:
                    report.skipped.append(str(entry))
                continue
            try:
                if report is not None:
                    report.tmp.append(str(entry))
                    report.bytes_freed += _tree_size(entry) if entry.is_dir() else entry.stat().st_size
                if not dry_run:
                    log.info("removing stale build directory %s", entry)
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            finally:
                lock.release(unlink=not dry_run)
        # lock files left without a directory
        for lock_path in self.tmp_dir.glob(f"{prefix}*.lock"):
            if (self.tmp_dir / lock_path.name[: -len(".lock")]).exists():
                continue
            lock = _FileLock(lock_path)
            if lock.acquire(blocking=False):
                lock.release(unlink=not dry_run)

    # ------------------------------------------------------------ inspecting

    def _object_dirs(self) -> list[Path]:
        if not self.objects_dir.is_dir():
            return []
        return sorted(p for p in self.objects_dir.iterdir() if p.is_dir() and is_hex_digest(p.name))

    def _key_records(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if not self.keys_dir.is_dir():
            return out
        for p in self.keys_dir.glob("*.json"):
            if p.name.startswith("."):
                continue
            rec = self.key_record(p.stem)
            if rec is not None:
                out[p.stem] = rec
        return out

    def ls(self, kind: str | None = None) -> list[ArtifactInfo]:
        """Every stored object (not validated), oldest first; `kind` filters."""
        keys_by_digest: dict[str, list[str]] = {}
        for key, rec in self._key_records().items():
            keys_by_digest.setdefault(rec["digest"], []).append(key)
        rows = []
        for d in self._object_dirs():
            try:
                m = json.loads((d / MANIFEST_NAME).read_text())
            except (OSError, ValueError):
                m = {}
            info = ArtifactInfo(
                digest=d.name,
                kind=str(m.get("kind", "?")),
                keys=sorted(keys_by_digest.get(d.name, [])),
                total_size=int(m.get("total_size", 0) or 0),
                file_count=int(m.get("file_count", len(m.get("files", []))) or 0),
                created=m.get("created"),
                build_seconds=m.get("build_seconds"),
                path=str(d),
            )
            if kind is None or info.kind == kind:
                rows.append(info)
        rows.sort(key=lambda r: (r.created or "", r.digest))
        return rows

    def find(self, prefix: str) -> str:
        """The digest of the one object whose digest (or, failing that, recipe key) starts with `prefix`."""
        prefix = prefix.strip().lower()
        if not prefix:
            raise ArtifactMissing("empty digest prefix")
        matches = [d.name for d in self._object_dirs() if d.name.startswith(prefix)]
        if not matches:
            matches = sorted(
                {rec["digest"] for key, rec in self._key_records().items() if key.startswith(prefix)}
            )
            matches = [m for m in matches if (self.objects_dir / m).is_dir()]
        if not matches:
            raise ArtifactMissing(f"no artifact matches {prefix!r} in {self.root}")
        if len(matches) > 1:
            raise AmbiguousPrefix(
                f"{prefix!r} matches {len(matches)} artifacts: " + ", ".join(m[:12] for m in matches[:10])
            )
        return matches[0]

    def show(self, digest_or_prefix: str) -> dict[str, Any]:
        """Manifest of one object (by digest/key prefix) plus its `path` and the recipe `keys` mapping to it."""
        digest = self.find(digest_or_prefix)
        out: dict[str, Any]
        try:
            out = dict(self.manifest(digest))
        except ArtifactMissing as exc:
            out = {"digest": digest, "error": str(exc)}
        out["path"] = str(self.objects_dir / digest)
        out["keys"] = sorted(k for k, rec in self._key_records().items() if rec["digest"] == digest)
        return out

    def verify(self, digest: str | None = None) -> list[Problem]:
        """Full re-hash of every object (or the one matching `digest`, a prefix is fine): [] = all good."""
        digests = [self.find(digest)] if digest else [d.name for d in self._object_dirs()]
        problems: list[Problem] = []
        for dg in digests:
            problems += [Problem(dg, msg) for msg in self.check(dg, full=True)]
        return problems

    # ------------------------------------------------------------ garbage collection

    def gc(self, *, dry_run: bool = False, keep_unreferenced: bool = False) -> GcReport:
        """Remove stale build dirs (their producer is gone), leftovers in trash/, key files whose object is
        missing, and objects no key refers to (directly or as a recorded input of a kept object).
        Producers are never disturbed: live build dirs and keys being built are skipped, and publishing is
        excluded while gc runs."""
        report = GcReport(dry_run=dry_run)
        if not self.root.is_dir():
            return report
        self._ensure_dirs()
        with self._gc_lock(shared=False):
            self._clean_stale_tmp(dry_run=dry_run, report=report)
            for p in self.keys_dir.glob(".*.tmp"):
                if time.time() - p.stat().st_mtime > 600:
                    report.tmp.append(str(p))
                    if not dry_run:
                        p.unlink(missing_ok=True)
            for p in sorted(self.trash_dir.iterdir()):
                report.trash.append(str(p))
                report.bytes_freed += _tree_size(p) if p.is_dir() else p.stat().st_size
                if not dry_run:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            # key files: unreadable, or their object is gone
            live: dict[str, str] = {}
            for p in sorted(self.keys_dir.glob("*.json")):
                if p.name.startswith("."):
                    continue
                key = p.stem
                rec = self.key_record(key)
                if rec is not None and (self.objects_dir / rec["digest"]).is_dir():
                    live[key] = rec["digest"]
                    continue
                lock = self._key_lock(key)
                if not lock.acquire(blocking=False):
                    report.skipped.append(str(p))
                    if rec is not None:
                        live[key] = rec["digest"]
                    continue
                try:
                    report.keys.append(key)
                    if not dry_run:
                        p.unlink(missing_ok=True)
                finally:
                    lock.release(unlink=not dry_run)
            # objects: keep those reachable from a live key (and their recorded inputs)
            reachable: set[str] = set()
            stack = list(live.values())
            while stack:
                dg = stack.pop()
                if dg in reachable:
                    continue
                reachable.add(dg)
                with contextlib.suppress(ArtifactMissing, AttributeError, TypeError):
                    for ref in (self.manifest(dg).get("inputs") or {}).values():
                        if isinstance(ref, dict) and is_hex_digest(str(ref.get("digest", ""))):
                            stack.append(ref["digest"])
            if not keep_unreferenced:
                for d in self._object_dirs():
                    if d.name in reachable:
                        continue
                    report.objects.append(d.name)
                    report.bytes_freed += _tree_size(d)
                    if not dry_run:
                        dst = self.trash_dir / f"{d.name}.gc.{secrets.token_hex(4)}"
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(d, dst)
                            shutil.rmtree(dst, ignore_errors=True)
            # lock files of keys that no longer exist
            if not dry_run:
                for p in self.locks_dir.glob("*.lock"):
                    if p.name.startswith(".") or (self.keys_dir / f"{p.stem}.json").exists():
                        continue
                    lock = _FileLock(p)
                    if lock.acquire(blocking=False):
                        lock.release(unlink=True)
        return report


__all__ = [
    "AmbiguousPrefix",
    "ArtifactInfo",
    "ArtifactMissing",
    "ArtifactRef",
    "ArtifactStore",
    "GcReport",
    "Problem",
    "default_store",
    "hash_file",
    "producer_versions",
    "store_root",
]
