"""A Prefect cache policy keyed on the artifact store's recipe keys.

`ArtifactCachePolicy(kind, version)` computes the same recipe key as `ArtifactStore.get_or_build`:
kind, recipe version, the task's non-ArtifactRef arguments as parameters, and the *current* content digests
of its ArtifactRef arguments (resolved through the store). Prefect decides "Cached" only from the existence
of its result record, so the policy consults the store first and never lets Prefect return a ref to an
artifact that is not valid right now:

===========================================  ===============================================================
store state for the recipe key               Prefect key returned
===========================================  ===============================================================
mapped, object valid, no Prefect record       recipe key (task runs, store hit, record written)
mapped, object valid, record names it         recipe key -> Prefect shows ``Cached``
mapped, object valid, record names another    ``sha256(recipe key + ":" + digest)`` (a rebuild produced other
digest (non-deterministic rebuild)            bytes): its record, once written, names the current digest;
                                              None if even that record disagrees
mapped, object missing or damaged             None: the task runs and the store rebuilds
not mapped, no Prefect record                 recipe key (first run; the record is written after it)
not mapped, Prefect has a record (store       None: the task runs and the store builds
wiped or another store root)
an input artifact missing                     None: the task body raises a clear ArtifactMissing
===========================================  ===============================================================

Do not compose this policy with others (``+``): a compound policy drops None sub-keys, which would
re-enable a stale cache hit.

Prefect swallows exceptions raised in ``compute_key`` (it logs them and runs the task uncached). With
``strict=True`` (the default) the error is also remembered for the task run, and `artifact_task`'s body
raises it, so a broken key fails loudly instead of silently disabling caching.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from artifacts.keys import ArtifactRef, recipe_key, split_arguments
from artifacts.store import ArtifactMissing, ArtifactStore, default_store

log = logging.getLogger("mathforge.artifacts")

_KEY_ERRORS: dict[UUID, BaseException] = {}
_KEY_ERRORS_LOCK = threading.Lock()


class CacheKeyError(RuntimeError):
    """The artifact cache key of a task run could not be computed (a bug, never an expected state)."""


def pop_key_error(task_run_id: UUID | None) -> BaseException | None:
    """The exception `ArtifactCachePolicy.compute_key` raised for this task run, if any (removed)."""
    if task_run_id is None:
        return None
    with _KEY_ERRORS_LOCK:
        return _KEY_ERRORS.pop(task_run_id, None)


def derived_key(key: str, digest: str) -> str:
    """The Prefect key used when the record at `key` names another digest than the store's current one."""
    return hashlib.sha256(f"{key}:{digest}".encode()).hexdigest()


@dataclass
class ArtifactCachePolicy(CachePolicy):
    """Prefect cache key = the artifact recipe key, valid only while the artifact is valid in the store.

    kind, version: the recipe's kind and version (as given to `artifact_task`).
    root: store root; None = `default_store()` at compute time ($MATHFORGE_HOME may change).
    strict: remember key-computation errors so the task body re-raises them (see module docstring).
    """

    kind: str = ""
    version: int = 0
    root: str | None = None
    strict: bool = True

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root) if self.root else default_store()

    def recipe_key(self, inputs: dict[str, Any], store: ArtifactStore | None = None) -> str:
        """The recipe key for these task inputs (ArtifactRefs resolved to current digests)."""
        store = store or self.store()
        refs, params = split_arguments(inputs)
        digests = {name: store.resolve(ref).digest for name, ref in refs.items()}
        return recipe_key(self.kind, self.version, params, digests)

    def compute_key(
        self,
        task_ctx: TaskRunContext | None,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        try:
            return self._compute(task_ctx, inputs)
        except Exception as exc:
            task_run = getattr(task_ctx, "task_run", None)
            if self.strict and task_run is not None:
                with _KEY_ERRORS_LOCK:
                    _KEY_ERRORS[task_run.id] = exc
            log.error("artifact cache key for %s v%s failed: %r", self.kind, self.version, exc)
            raise

    def _compute(self, task_ctx: TaskRunContext | None, inputs: dict[str, Any]) -> str | None:
        store = self.store()
        try:
            key = self.recipe_key(inputs, store)
        except ArtifactMissing as exc:
            log.warning("not caching %s: %s", self.kind, exc)
            return None  # the task body raises the same clear error
        result_store = getattr(task_ctx, "result_store", None)
        digest = store.key_digest(key)
        if digest is None:
            # Nothing in the store: the task must build. If Prefect has a record for this key (store wiped,
            # or a different root), a key would make it return `Cached` with a ref to nothing.
            return None if _record_status(result_store, key, None) != "absent" else key
        problems = store.check(digest)
        if problems:
            log.warning(
                "%s %s (key %s) is missing or damaged in the store (%s): running the task to rebuild it",
                self.kind,
                digest[:12],
                key[:12],
                "; ".join(problems[:3]),
            )
            return None
        for candidate in (key, derived_key(key, digest)):
            if _record_status(result_store, candidate, digest) != "mismatch":
                return candidate
        return None


def _record_status(result_store: Any, key: str, digest: str | None) -> str:
    """'absent', 'present' (digest None), 'match' or 'mismatch': Prefect's record for `key` vs `digest`."""
    if result_store is None:
        return "absent"
    try:
        if not result_store.exists(key):
            return "absent"
    except Exception:  # unreadable storage: safest is to assume a record exists
        return "present" if digest is None else "mismatch"
    if digest is None:
        return "present"
    try:
        value = result_store.read(key).result
    except Exception:
        return "mismatch"
    return "match" if isinstance(value, ArtifactRef) and value.digest == digest else "mismatch"
