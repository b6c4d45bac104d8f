"""artifact_task and ArtifactCachePolicy against a real Prefect server (the session's shared server).

Everything Prefect-related about artifacts lives in this one module to pay for the server start once.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from artifacts import (
    ArtifactCachePolicy,
    ArtifactRef,
    ArtifactStore,
    CacheKeyError,
    artifact_task,
    default_store,
)
from artifacts.keys import recipe_key

BUILDS: list[str] = []


@artifact_task("pt-text", 1)
def make_text(text: str, salt: str, repeat: int = 2, *, out: Path) -> None:
    BUILDS.append(f"text:{text}")
    (out / "text.txt").write_text(text * repeat)


@artifact_task("pt-shout", 1)
def shout(src: ArtifactRef, out: Path) -> None:
    BUILDS.append("shout")
    body = (default_store().path(src) / "text.txt").read_text()
    (out / "shout.txt").write_text(body.upper() + "!")


@artifact_task("pt-join", 1)
def join(parts: list[ArtifactRef], sep: str, out: Path) -> None:
    BUILDS.append("join")
    store = default_store()
    (out / "joined.txt").write_text(sep.join((store.path(p) / "text.txt").read_text() for p in parts))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ArtifactStore:
    """artifact_task uses default_store() at run time: point it at a fresh root."""
    monkeypatch.delenv("MATHFORGE_ARTIFACTS", raising=False)
    monkeypatch.setenv("MATHFORGE_HOME", str(tmp_path / "home"))
    BUILDS.clear()
    return default_store()


@pytest.fixture(scope="module")
def prefect_api(prefect_server):
    """The session's real Prefect server (tests/conftest.py), as this process's API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


# ---------------------------------------------------------------- no server needed


def test_artifact_ref_round_trips_prefect_json() -> None:
    from prefect.serializers import JSONSerializer

    ref = ArtifactRef(kind="ckpt", key="a" * 64, digest="b" * 64)
    ser = JSONSerializer()
    blob = ser.dumps(ref)
    assert b"artifacts.keys.ArtifactRef" in blob and b"path" not in blob
    assert ser.loads(blob) == ref


def test_fn_without_prefect_uses_the_same_keys(store: ArtifactStore) -> None:
    salt = uuid.uuid4().hex
    ref = make_text.fn("ab", salt)
    assert ref.key == recipe_key(
        "pt-text", 1, {"text": "ab", "salt": salt, "repeat": 2}, {}
    )  # default included
    assert (store.path(ref) / "text.txt").read_text() == "abab"
    policy = make_text.cache_policy
    assert isinstance(policy, ArtifactCachePolicy) and (policy.kind, policy.version) == ("pt-text", 1)
    assert policy.compute_key(None, {"text": "ab", "salt": salt, "repeat": 2}, {}) == ref.key
    assert make_text.fn("ab", salt) == ref and BUILDS == ["text:ab"]
    down = shout.fn(ref)
    assert down.key == recipe_key("pt-shout", 1, {}, {"src": ref.digest})
    assert shout.cache_policy.compute_key(None, {"src": ref}, {}) == down.key
    assert (store.path(down) / "shout.txt").read_text() == "ABAB!"
    other = make_text.fn("cd", salt)
    joined = join.fn([ref, other], sep="+")
    assert joined.key == recipe_key(
        "pt-join", 1, {"sep": "+"}, {"parts[0]": ref.digest, "parts[1]": other.digest}
    )
    assert (store.path(joined) / "joined.txt").read_text() == "abab+cdcd"
    assert make_text.result_serializer == "json" and make_text.persist_result is True


def test_policy_decision_table(store: ArtifactStore, tmp_path: Path) -> None:
    """compute_key against a real Prefect ResultStore: every row of the table in prefect_cache's docstring."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    from artifacts.prefect_cache import derived_key

    results = ResultStore(
        result_storage=LocalFileSystem(basepath=str(tmp_path / "results")), serializer=JSONSerializer()
    )
    ctx = SimpleNamespace(result_store=results, task_run=None)
    policy = ArtifactCachePolicy(kind="pt-nd", version=1)
    content = {"v": "1"}

    @artifact_task("pt-nd", 1)
    def nondeterministic(name: str, out: Path) -> None:
        (out / "v.txt").write_text(content["v"])

    inputs = {"name": uuid.uuid4().hex}
    key = recipe_key("pt-nd", 1, inputs, {})
    # not mapped, no record -> the recipe key (first run writes the record)
    assert policy.compute_key(ctx, inputs, {}) == key
    ref1 = nondeterministic.fn(**inputs)
    results.write(obj=ref1, key=key)
    # mapped + valid + record names it -> recipe key (Prefect: Cached)
    assert policy.compute_key(ctx, inputs, {}) == key
    # object missing -> None (task runs, store rebuilds)
    shutil.rmtree(store.path(ref1))
    assert policy.compute_key(ctx, inputs, {}) is None
    # rebuilt with other bytes: the record at the recipe key names a stale digest -> derived key
    content["v"] = "2"
    ref2 = nondeterministic.fn(**inputs)
    assert ref2.digest != ref1.digest
    assert policy.compute_key(ctx, inputs, {}) == derived_key(key, ref2.digest)
    results.write(obj=ref2, key=derived_key(key, ref2.digest))
    assert policy.compute_key(ctx, inputs, {}) == derived_key(key, ref2.digest)
    # damaged object -> None
    (store.path(ref2) / "v.txt").write_text("9")
    assert policy.compute_key(ctx, inputs, {}) is None
    # store wiped but Prefect still has a record -> None
    shutil.rmtree(store.root)
    assert policy.compute_key(ctx, inputs, {}) is None
    # a missing input artifact -> None (the task body raises the clear error)
    assert shout.cache_policy.compute_key(ctx, {"src": ref2}, {}) is None


# ---------------------------------------------------------------- flows on a real server


def _flows():
    from prefect import flow

    @flow
    def two_step(text: str, salt: str) -> dict:
        s1 = make_text(text, salt, return_state=True)
        ref1 = s1.result()
        s2 = shout(ref1, return_state=True)
        return {"states": [s1.name, s2.name], "refs": [ref1, s2.result()]}

    return two_step


def _record_path(key: str) -> Path:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    return Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).expanduser() / key


def test_flow_runs_cache_and_rebuild(prefect_api, store: ArtifactStore) -> None:
    two_step = _flows()
    salt = uuid.uuid4().hex

    first = two_step("ab", salt)
    assert first["states"] == ["Completed", "Completed"]
    assert BUILDS == ["text:ab", "shout"]
    ref1, ref2 = first["refs"]
    # the Prefect cache key IS the recipe key: Prefect wrote its result record under that name
    assert _record_path(ref1.key).is_file() and _record_path(ref2.key).is_file()

    second = two_step("ab", salt)
    assert second["states"] == ["Cached", "Cached"]
    assert second["refs"] == [ref1, ref2] and BUILDS == ["text:ab", "shout"]

    # an object deleted by hand: its task runs (not Cached) and rebuilds; the unchanged downstream stays Cached
    shutil.rmtree(store.path(ref1))
    third = two_step("ab", salt)
    assert third["states"] == ["Completed", "Cached"]
    assert BUILDS == ["text:ab", "shout", "text:ab"]
    assert [store.resolve(r) for r in third["refs"]] == [ref1, ref2]
    assert store.verify() == []

    # the whole store wiped: Prefect still has records, but nothing may come back Cached
    shutil.rmtree(store.root)
    fourth = two_step("ab", salt)
    assert fourth["states"] == ["Completed", "Completed"]
    assert BUILDS == ["text:ab", "shout", "text:ab", "text:ab", "shout"]
    assert [store.resolve(r) for r in fourth["refs"]] == [ref1, ref2]

    fifth = two_step("ab", salt)
    assert fifth["states"] == ["Cached", "Cached"] and len(BUILDS) == 5


def test_key_errors_fail_the_task_loudly(prefect_api, store: ArtifactStore, monkeypatch) -> None:
    from prefect import flow

    def broken(self, task_ctx, inputs):
        raise RuntimeError("boom in key")

    monkeypatch.setattr(ArtifactCachePolicy, "_compute", broken)

    @flow
    def one(salt: str):
        state = make_text("zz", salt, return_state=True)
        return state.is_failed(), state.result(raise_on_failure=False)

    failed, exc = one(uuid.uuid4().hex)
    assert failed and isinstance(exc, CacheKeyError) and "boom in key" in str(exc)
    assert BUILDS == []  # nothing was built uncached behind Prefect's back
