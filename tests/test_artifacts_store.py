"""The artifact store on real files and real processes (no Prefect here: see test_artifacts_prefect.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from artifacts import (
    ArtifactMissing,
    ArtifactRef,
    ArtifactStore,
    RecipeParamError,
    canonical_json,
    content_digest,
    default_store,
    recipe_key,
)
from artifacts.keys import MANIFEST_NAME, split_arguments
from mathforge.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def write_files(root: Path, files: dict[str, bytes], order: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel in order or list(files):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[rel])
    return root


def counting_build(counter: list[str], files: dict[str, bytes], meta: dict | None = None):
    def build(out: Path):
        counter.append("built")
        write_files(out, files)
        return meta

    return build


FILES = {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01" * 500, "sub/deeper/c.json": b"{}"}


# ---------------------------------------------------------------- digests and keys


def test_digest_stable_under_file_order_and_mtime(tmp_path: Path) -> None:
    d1 = write_files(tmp_path / "one", FILES, order=["a.txt", "sub/b.bin", "sub/deeper/c.json"])
    d2 = write_files(tmp_path / "two", FILES, order=["sub/deeper/c.json", "sub/b.bin", "a.txt"])
    os.utime(d2 / "a.txt", ns=(1_000_000_000, 1_000_000_000))
    os.utime(d2 / "sub" / "b.bin", ns=(5_000_000_000_000, 5_000_000_000_000))
    assert content_digest(d1) == content_digest(d2)
    (d2 / MANIFEST_NAME).write_text('{"ignored": true}')  # the top-level manifest is not content
    assert content_digest(d1) == content_digest(d2)
    (d2 / "sub" / MANIFEST_NAME).write_text("{}")  # ...but a nested file of that name is
    assert content_digest(d1) != content_digest(d2)
    (d2 / "sub" / MANIFEST_NAME).unlink()
    (d2 / "a.txt").rename(d2 / "a2.txt")  # names are content
    assert content_digest(d1) != content_digest(d2)
    (d2 / "a2.txt").rename(d2 / "a.txt")
    (d2 / "a.txt").write_bytes(b"alphA")
    assert content_digest(d1) != content_digest(d2)


def test_recipe_key_depends_on_recipe_only() -> None:
    dg1, dg2 = "a" * 64, "b" * 64
    base = recipe_key("fp8", 1, {"scheme": "fp8", "n": 512, "opts": {"x": 1, "y": [1, 2]}}, {"ckpt": dg1})
    # canonical: dict order, tuples vs lists do not matter
    assert base == recipe_key(
        "fp8", 1, {"opts": {"y": (1, 2), "x": 1}, "n": 512, "scheme": "fp8"}, {"ckpt": dg1}
    )
    assert base != recipe_key(
        "fp8", 2, {"scheme": "fp8", "n": 512, "opts": {"x": 1, "y": [1, 2]}}, {"ckpt": dg1}
    )
    assert base != recipe_key(
        "fp8", 1, {"scheme": "fp8", "n": 513, "opts": {"x": 1, "y": [1, 2]}}, {"ckpt": dg1}
    )
    assert base != recipe_key(
        "fp8", 1, {"scheme": "fp8", "n": 512, "opts": {"x": 1, "y": [1, 2]}}, {"ckpt": dg2}
    )
    assert base != recipe_key(
        "bf16", 1, {"scheme": "fp8", "n": 512, "opts": {"x": 1, "y": [1, 2]}}, {"ckpt": dg1}
    )
    assert base != recipe_key(
        "fp8", 1, {"scheme": "fp8", "n": 512, "opts": {"x": 1, "y": [1, 2]}}, {"model": dg1}
    )
    assert recipe_key("k", 1, {"v": 1}, {}) != recipe_key("k", 1, {"v": 1.5}, {})
    assert recipe_key("k", 1, {"v": True}, {}) != recipe_key("k", 1, {"v": 1}, {})

    class Cfg(BaseModel):
        lr: float = 1e-3
        steps: int = 10

    assert recipe_key("k", 1, {"cfg": Cfg()}, {}) == recipe_key(
        "k", 1, {"cfg": {"steps": 10, "lr": 0.001}}, {}
    )
    assert canonical_json({"b": [1, (2, 3)], "a": None}) == '{"a":null,"b":[1,[2,3]]}'


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (Path("/data/ckpt"), "is a path"),
        ({1, 2}, "set is not a supported"),
        (float("nan"), "not a finite number"),
        ({1: "x"}, "not a string"),
        (object(), "object is not a supported"),
        ([ArtifactRef(kind="k", key="0" * 64, digest="1" * 64), 3], "ArtifactRef inside a parameter"),
    ],
)
def test_recipe_key_rejects_non_json_params(bad: object, fragment: str) -> None:
    with pytest.raises(RecipeParamError, match=fragment) as info:
        recipe_key("k", 1, {"p": bad}, {})
    assert "params['p']" in str(info.value)


def test_recipe_key_independent_of_paths_and_mtimes(tmp_path: Path) -> None:
    """The same input bytes in two stores (two roots: two hosts) give the same downstream key."""
    s1, s2 = ArtifactStore(tmp_path / "host1"), ArtifactStore(tmp_path / "elsewhere" / "host2")
    r1 = s1.get_or_build("data", 1, {"n": 1}, {}, counting_build([], FILES))
    r2 = s2.get_or_build("data", 1, {"n": 1}, {}, counting_build([], FILES))
    assert r1 == r2
    k1 = s1.recipe_key("model", 3, {"lr": 0.1}, {"data": r1})
    for f in s2.path(r2).rglob("*"):
        if f.is_file():
            os.utime(f, ns=(7_000_000_000, 7_000_000_000))
    assert s2.recipe_key("model", 3, {"lr": 0.1}, {"data": r2}) == k1
    assert k1 == recipe_key("model", 3, {"lr": 0.1}, {"data": r1.digest})


def test_split_arguments_lists_of_refs() -> None:
    a = ArtifactRef(kind="k", key="0" * 64, digest="1" * 64)
    b = ArtifactRef(kind="k", key="2" * 64, digest="3" * 64)
    refs, params = split_arguments({"base": a, "shards": [a, b], "n": 3, "empty": []})
    assert refs == {"base": a, "shards[0]": a, "shards[1]": b}
    assert params == {"n": 3, "empty": []}


# ---------------------------------------------------------------- get_or_build, publish


def test_get_or_build_builds_once_and_records_manifest(store: ArtifactStore) -> None:
    builds: list[str] = []
    ref = store.get_or_build("demo", 1, {"n": 1}, {}, counting_build(builds, FILES, meta={"loss": 0.5}))
    assert isinstance(ref, ArtifactRef) and ref.kind == "demo"
    assert ref.key == recipe_key("demo", 1, {"n": 1}, {})
    assert ref.digest == content_digest(store.path(ref))
    assert store.get_or_build("demo", 1, {"n": 1}, {}, counting_build(builds, FILES)) == ref
    assert builds == ["built"]
    m = store.manifest(ref)
    assert m["kind"] == "demo" and m["digest"] == ref.digest and m["key"] == ref.key
    assert m["recipe"] == {"kind": "demo", "version": 1, "params": {"n": 1}}
    assert m["inputs"] == {}
    assert m["meta"] == {"loss": 0.5}
    assert {"python", "mathforge", "torch"} <= set(m["producer"])
    assert sorted(f["path"] for f in m["files"]) == sorted(FILES)
    assert all(len(f["sha256"]) == 64 and f["size"] == len(FILES[f["path"]]) for f in m["files"])
    assert m["total_size"] == sum(len(v) for v in FILES.values()) and m["file_count"] == 3
    assert m["created"] and m["build_seconds"] >= 0
    # a downstream artifact records its inputs and keys on their digests
    down = store.get_or_build("down", 1, {}, {"src": ref}, lambda out: (out / "x").write_text("x"))
    assert store.manifest(down)["inputs"] == {"src": ref.model_dump()}
    assert down.key == recipe_key("down", 1, {}, {"src": ref.digest})


def test_publish_is_atomic(store: ArtifactStore) -> None:
    started, release = threading.Event(), threading.Event()
    result: list[ArtifactRef] = []

    def slow_build(out: Path) -> None:
        write_files(out, FILES)
        started.set()
        assert release.wait(10)

    t = threading.Thread(target=lambda: result.append(store.get_or_build("slow", 1, {}, {}, slow_build)))
    t.start()
    assert started.wait(10)
    key = recipe_key("slow", 1, {}, {})
    # mid-build: the files exist only in tmp/, nothing is visible under objects/ or keys/
    assert list(store.objects_dir.iterdir()) == []
    assert store.lookup(key) is None and store.key_digest(key) is None
    assert any(store.tmp_dir.iterdir())
    release.set()
    t.join(10)
    (ref,) = result
    assert store.check(ref) == [] and store.lookup(key) == ref
    assert [p for p in store.tmp_dir.iterdir()] == []  # build dir and its lock are gone


def test_failed_build_leaves_nothing(store: ArtifactStore) -> None:
    def broken(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        store.get_or_build("broken", 1, {}, {}, broken)
    assert list(store.objects_dir.iterdir()) == []
    assert list(store.keys_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []
    with pytest.raises(ValueError, match="reserved"):
        store.get_or_build("bad", 1, {}, {}, lambda out: (out / MANIFEST_NAME).write_text("{}"))
    assert list(store.objects_dir.iterdir()) == []


def test_build_symlinks_are_materialized(store: ArtifactStore, tmp_path: Path) -> None:
    outside = write_files(tmp_path / "outside", {"w.bin": b"weights"})

    def build(out: Path) -> None:
        (out / "w.bin").symlink_to(outside / "w.bin")
        (out / "dir").symlink_to(outside, target_is_directory=True)

    ref = store.get_or_build("linked", 1, {}, {}, build)
    p = store.path(ref)
    assert not (p / "w.bin").is_symlink() and (p / "w.bin").read_bytes() == b"weights"
    assert not (p / "dir").is_symlink() and (p / "dir" / "w.bin").read_bytes() == b"weights"
    assert store.verify() == []


def test_same_content_from_two_recipes_shares_one_object(store: ArtifactStore) -> None:
    r1 = store.get_or_build("a", 1, {"x": 1}, {}, counting_build([], FILES))
    r2 = store.get_or_build("a", 1, {"x": 2}, {}, counting_build([], FILES))
    assert r1.digest == r2.digest and r1.key != r2.key
    assert [d.name for d in store.objects_dir.iterdir()] == [r1.digest]
    assert sorted(store.show(r1.digest)["keys"]) == sorted([r1.key, r2.key])


def test_threads_in_one_process_build_once(store: ArtifactStore) -> None:
    builds: list[str] = []

    def build(out: Path) -> None:
        builds.append("b")
        time.sleep(0.3)
        write_files(out, FILES)

    refs: list[ArtifactRef] = []
    threads = [
        threading.Thread(target=lambda: refs.append(store.get_or_build("t", 1, {}, {}, build)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(refs) == 4 and len(set(refs)) == 1 and builds == ["b"]


# ---------------------------------------------------------------- real processes

PRODUCER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from artifacts.store import ArtifactStore

    root, counter, delay, marker = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

    def build(out):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\\n")
        (out / "part1.bin").write_bytes(b"a" * 4096)
        if marker != "-":
            Path(marker).write_text("building")
        time.sleep(delay)
        (out / "part2.bin").write_bytes(b"b" * 4096)

    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    ref = ArtifactStore(root).get_or_build("proc", 1, {"n": 1}, {}, build, progress=say)
    print(ref.model_dump_json(), flush=True)
    """
)


def start_producer(
    tmp_path: Path, root: Path, delay: float, marker: str = "-", tag: str = "p"
) -> subprocess.Popen:
    script = tmp_path / "producer.py"
    if not script.exists():
        script.write_text(PRODUCER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), str(root), str(tmp_path / "builds.txt"), str(delay), marker],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / f"{tag}.err", "w"),
        text=True,
        env=env,
        cwd=str(REPO),
    )


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def builds_in(tmp_path: Path) -> list[str]:
    f = tmp_path / "builds.txt"
    return f.read_text().split() if f.exists() else []


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    procs = [start_producer(tmp_path, root, delay=1.5, tag=f"p{i}") for i in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [
        (tmp_path / f"p{i}.err").read_text() for i in range(3)
    ]
    refs = {ArtifactRef.model_validate_json(o.strip()) for o in outs}
    assert len(refs) == 1
    assert len(builds_in(tmp_path)) == 1
    assert ArtifactStore(root).verify() == []


def test_waiter_logs_and_reuses(tmp_path: Path) -> None:
    root, marker = tmp_path / "store", tmp_path / "building"
    a = start_producer(tmp_path, root, delay=2.0, marker=str(marker), tag="a")
    wait_for(marker.exists, 30, "producer A to start building")
    b = start_producer(tmp_path, root, delay=0.0, tag="b")
    out_a, out_b = a.communicate(timeout=60)[0], b.communicate(timeout=60)[0]
    assert a.returncode == 0 and b.returncode == 0
    assert out_a == out_b
    assert len(builds_in(tmp_path)) == 1
    assert "waiting for another producer" in (tmp_path / "b.err").read_text()


def test_killed_producer_does_not_block_and_leaves_no_corrupt_object(tmp_path: Path) -> None:
    root, marker = tmp_path / "store", tmp_path / "building"
    a = start_producer(tmp_path, root, delay=120.0, marker=str(marker), tag="a")
    wait_for(marker.exists, 30, "producer A to start building")
    b = start_producer(tmp_path, root, delay=0.0, tag="b")
    wait_for(
        lambda: "waiting for another producer" in (tmp_path / "b.err").read_text(), 30, "B to wait for A"
    )
    os.kill(a.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    out_b = b.communicate(timeout=30)[0]
    assert b.returncode == 0, (tmp_path / "b.err").read_text()
    assert time.monotonic() - killed_at < 5.0
    a.wait(10)
    ref = ArtifactRef.model_validate_json(out_b.strip())
    store = ArtifactStore(root)
    assert len(builds_in(tmp_path)) == 2  # A started, B built
    assert [d.name for d in store.objects_dir.iterdir()] == [ref.digest]
    assert store.verify() == []
    assert sorted(f.name for f in store.path(ref).iterdir()) == [MANIFEST_NAME, "part1.bin", "part2.bin"]
    assert list(store.tmp_dir.iterdir()) == []  # B removed A's half-written build dir before building


def test_gc_removes_build_dir_of_killed_producer(tmp_path: Path) -> None:
    root, marker = tmp_path / "store", tmp_path / "building"
    a = start_producer(tmp_path, root, delay=120.0, marker=str(marker), tag="a")
    wait_for(marker.exists, 30, "producer A to start building")
    store = ArtifactStore(root)
    live = store.gc(dry_run=True)
    assert live.tmp == [] and live.skipped  # a live producer's dir is never touched
    os.kill(a.pid, signal.SIGKILL)
    a.wait(10)
    dry = store.gc(dry_run=True)
    assert len(dry.tmp) == 1 and any(store.tmp_dir.iterdir())
    report = store.gc()
    assert len(report.tmp) == 1 and report.bytes_freed >= 4096
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.objects_dir.iterdir()) == []


# ---------------------------------------------------------------- damage


def test_deleted_object_is_rebuilt(store: ArtifactStore) -> None:
    import shutil

    builds: list[str] = []
    ref = store.get_or_build("demo", 1, {}, {}, counting_build(builds, FILES))
    shutil.rmtree(store.path(ref))
    with pytest.raises(ArtifactMissing, match="missing or damaged"):
        store.resolve(ref)
    again = store.get_or_build("demo", 1, {}, {}, counting_build(builds, FILES))
    assert again == ref and builds == ["built", "built"]
    assert store.resolve(ref) == ref and store.verify() == []


def test_corrupted_file_is_reported_and_rebuilt(store: ArtifactStore) -> None:
    builds: list[str] = []
    ref = store.get_or_build("demo", 1, {}, {}, counting_build(builds, FILES))
    (store.path(ref) / "a.txt").write_bytes(b"ALPHA")  # same size, new bytes
    problems = store.verify()
    assert len(problems) == 1 and problems[0].digest == ref.digest and "a.txt" in problems[0].message
    assert store.check(ref) != []  # small artifacts are fully re-hashed on every hit
    again = store.get_or_build("demo", 1, {}, {}, counting_build(builds, FILES))
    assert again == ref and builds == ["built", "built"]
    assert store.verify() == [] and (store.path(ref) / "a.txt").read_bytes() == b"alpha"
    # missing and extra files are damage too
    (store.path(ref) / "a.txt").unlink()
    assert any("missing file a.txt" in p for p in store.check(ref))
    store.get_or_build("demo", 1, {}, {}, counting_build(builds, FILES))
    (store.path(ref) / "extra").write_text("x")
    assert any("unexpected file extra" in p for p in store.check(ref))
    store.get_or_build("demo", 1, {}, {}, counting_build(builds, FILES))
    assert builds == ["built"] * 4 and store.verify() == []


def test_large_artifacts_rehash_files_whose_mtime_changed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store", full_hash_max_bytes=0)  # every artifact counts as large
    ref = store.get_or_build("big", 1, {}, {}, counting_build([], FILES))
    f = store.path(ref) / "sub" / "b.bin"
    st = f.stat()
    f.write_bytes(b"\x07" * st.st_size)  # same size, new mtime -> re-hashed on the hit
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # (timestamps are tick-granular)
    assert any("content changed" in p for p in ArtifactStore(store.root, full_hash_max_bytes=0).check(ref))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime forged back: only a full verify sees it
    assert ArtifactStore(store.root, full_hash_max_bytes=0).check(ref) == []
    assert [p.digest for p in store.verify()] == [ref.digest]


def test_resolve_falls_back_to_key_mapping(store: ArtifactStore) -> None:
    import shutil

    content = {"n": b"1"}
    ref1 = store.get_or_build("nd", 1, {}, {}, lambda out: write_files(out, content) and None)
    shutil.rmtree(store.path(ref1))
    content["n"] = b"2"  # a non-deterministic rebuild: same key, other bytes
    ref2 = store.get_or_build("nd", 1, {}, {}, lambda out: write_files(out, content) and None)
    assert ref2.key == ref1.key and ref2.digest != ref1.digest
    assert store.resolve(ref1) == ref2
    downstream_key = store.recipe_key("down", 1, {}, {"src": ref1})
    assert downstream_key == recipe_key("down", 1, {}, {"src": ref2.digest})
    shutil.rmtree(store.path(ref2))
    with pytest.raises(ArtifactMissing):
        store.resolve(ref1)


def test_put_dir(store: ArtifactStore, tmp_path: Path) -> None:
    src = write_files(tmp_path / "ckpt", FILES)
    (src / MANIFEST_NAME).write_text("{}")  # e.g. copied out of another store: ignored
    (src / "link.txt").symlink_to(src / "a.txt")  # followed, like an HF snapshot's blob links
    ref = store.put_dir("checkpoint", src, params={"source": "local"})
    assert ref.digest == content_digest(src)
    assert (store.path(ref) / "link.txt").read_bytes() == b"alpha" and not (
        store.path(ref) / "link.txt"
    ).is_symlink()
    assert store.put_dir("checkpoint", src, params={"source": "local"}) == ref
    (src / "a.txt").write_bytes(b"changed")
    ref2 = store.put_dir("checkpoint", src, params={"source": "local"})
    assert ref2.key != ref.key and ref2.digest != ref.digest
    assert store.verify() == []


# ---------------------------------------------------------------- ls / show / verify / gc and the CLI


def test_ls_show_gc(store: ArtifactStore) -> None:
    import shutil

    a = store.get_or_build("a", 1, {}, {}, counting_build([], FILES))
    b = store.get_or_build("b", 1, {}, {"src": a}, lambda out: (out / "b").write_text("b"))
    assert [r.digest for r in store.ls()] == [a.digest, b.digest]
    assert [r.kind for r in store.ls(kind="b")] == ["b"]
    shown = store.show(b.digest[:8])
    assert shown["digest"] == b.digest and shown["keys"] == [b.key] and shown["path"] == str(store.path(b))
    assert store.show(b.key[:10])["digest"] == b.digest  # a recipe-key prefix works too
    # make garbage: a dangling key, an unreferenced object, a stale build dir
    c = store.get_or_build("c", 1, {}, {}, lambda out: (out / "c").write_text("c"))
    shutil.rmtree(store.path(c))
    orphan = store.get_or_build("orphan", 1, {}, {}, lambda out: (out / "o").write_text("o"))
    (store.keys_dir / f"{orphan.key}.json").unlink()
    (store.tmp_dir / "deadbeef.123.abc").mkdir()
    (store.tmp_dir / "deadbeef.123.abc" / "half").write_text("half")
    dry = store.gc(dry_run=True)
    assert dry.keys == [c.key] and dry.objects == [orphan.digest] and len(dry.tmp) == 1
    assert store.path(orphan).exists() and (store.keys_dir / f"{c.key}.json").exists()
    report = store.gc()
    assert report.keys == [c.key] and report.objects == [orphan.digest] and len(report.tmp) == 1
    assert not store.path(orphan).exists() and not (store.keys_dir / f"{c.key}.json").exists()
    assert list(store.tmp_dir.iterdir()) == []
    assert {r.digest for r in store.ls()} == {a.digest, b.digest}
    assert store.gc().objects == [] and store.verify() == []


def test_gc_keeps_inputs_of_kept_objects(store: ArtifactStore) -> None:
    a = store.get_or_build("a", 1, {}, {}, counting_build([], FILES))
    b = store.get_or_build("b", 1, {}, {"src": a}, lambda out: (out / "b").write_text("b"))
    (store.keys_dir / f"{a.key}.json").unlink()  # a is only reachable as b's recorded input
    assert store.gc().objects == []
    assert store.check(a) == [] and store.check(b) == []


def test_cli(store: ArtifactStore, capsys: pytest.CaptureFixture[str]) -> None:
    a = store.get_or_build("cli-kind", 1, {"n": 7}, {}, counting_build([], FILES))
    root = ["artifacts", "--root", str(store.root)]

    assert cli_main([*root, "ls"]) == 0
    out = capsys.readouterr().out
    assert a.digest[:12] in out and "cli-kind" in out and "1 artifacts" in out

    assert cli_main([*root, "ls", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["digest"] == a.digest and rows[0]["keys"] == [a.key] and rows[0]["file_count"] == 3

    assert cli_main([*root, "show", a.digest[:10]]) == 0
    out = capsys.readouterr().out
    assert a.digest in out and "sub/b.bin" in out and '"n": 7' in out

    assert cli_main([*root, "show", a.digest[:10], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["digest"] == a.digest and shown["recipe"]["params"] == {"n": 7}

    assert cli_main([*root, "show", "ffffffffff"]) == 2
    assert "no artifact matches" in capsys.readouterr().err

    assert cli_main([*root, "verify"]) == 0
    assert "OK" in capsys.readouterr().out

    (store.path(a) / "a.txt").write_bytes(b"xxxxx")
    assert cli_main([*root, "verify"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and a.digest[:12] in out and "a.txt" in out
    assert cli_main([*root, "verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"][0]["digest"] == a.digest

    (store.keys_dir / f"{a.key}.json").unlink()
    assert cli_main([*root, "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and a.digest in out and store.path(a).exists()
    assert cli_main([*root, "gc"]) == 0
    assert "removed" in capsys.readouterr().out and not store.path(a).exists()


def test_cli_default_root_is_mathforge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("MATHFORGE_ARTIFACTS", raising=False)
    monkeypatch.setenv("MATHFORGE_HOME", str(tmp_path / "home"))
    assert default_store().root == (tmp_path / "home" / "artifacts").resolve()
    ref = default_store().get_or_build("homekind", 1, {}, {}, counting_build([], FILES))
    assert cli_main(["artifacts", "ls", "--json"]) == 0
    assert [r["digest"] for r in json.loads(capsys.readouterr().out)] == [ref.digest]
    monkeypatch.delenv("MATHFORGE_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_store().root == (tmp_path / ".mathforge" / "artifacts").resolve()
