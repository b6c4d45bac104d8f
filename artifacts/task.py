"""`artifact_task`: a Prefect task whose result is an artifact in the store.

    @artifact_task("fp8_checkpoint", version=1, retries=1)
    def quantize(checkpoint: ArtifactRef, calibration: ArtifactRef, scheme: str, out: Path) -> None:
        src = default_store().path(checkpoint)
        ...write files into out...

    ref = quantize(ckpt_ref, calib_ref, "fp8")      # in a flow: a Prefect task run; returns an ArtifactRef
    ref = quantize.fn(ckpt_ref, calib_ref, "fp8")   # without Prefect: same key, same store, same ref

The decorated function takes its input artifacts as `ArtifactRef` arguments (or lists of them), its
parameters as plain JSON-like arguments (defaults included in the key) and a final `out: Path`, the empty
build directory to fill. The task (signature without `out`) resolves the refs to currently valid ones, calls
`store.get_or_build(kind, version, params, inputs, build)` and returns the ArtifactRef; `fn` only runs on a
store miss. The Prefect task uses `ArtifactCachePolicy` (same recipe key), `result_serializer="json"` and
`persist_result=True`, so a repeat run shows `Cached` in the UI, and never for an artifact that is gone.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.context import TaskRunContext

from artifacts.keys import ArtifactRef, join_arguments, split_arguments
from artifacts.prefect_cache import ArtifactCachePolicy, CacheKeyError, pop_key_error
from artifacts.store import ArtifactStore, default_store

log = logging.getLogger("mathforge.artifacts")

_RESERVED = ("cache_policy", "cache_key_fn", "result_serializer", "persist_result", "result_storage_key")


def _progress() -> Callable[[str], Any]:
    """Prefect's run logger inside a run (messages show in the UI), else the std 'mathforge.artifacts'."""
    try:
        from prefect.context import FlowRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            return get_run_logger().info
    except Exception:  # pragma: no cover - logging must never break a build
        pass
    return log.info


def artifact_task(
    kind: str, version: int, *, root: str | None = None, **task_kwargs: Any
) -> Callable[[Callable[..., None]], Task]:
    """Decorator: `fn(<ArtifactRef inputs...>, <params...>, out: Path) -> None` into a Prefect task that
    returns an ArtifactRef (see module docstring). `root` pins a store root (default: `default_store()` at
    run time); other keyword arguments go to `prefect.task` (name, retries, tags, timeout_seconds, ...)."""
    if not isinstance(kind, str) or not kind:
        raise TypeError("artifact_task: kind must be a non-empty string")
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError("artifact_task: version must be an int")
    bad = [k for k in _RESERVED if k in task_kwargs]
    if bad:
        raise TypeError(f"artifact_task sets {', '.join(bad)} itself (the artifact cache depends on them)")

    def decorate(fn: Callable[..., None]) -> Task:
        sig = inspect.signature(fn)
        if "out" not in sig.parameters:
            raise TypeError(
                f"{fn.__qualname__}: an artifact task needs an `out: Path` parameter (the build directory)"
            )
        kept = []
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise TypeError(f"{fn.__qualname__}: artifact tasks take named parameters only (got {p})")
            if p.name != "out":
                kept.append(p)
        task_sig = sig.replace(parameters=kept, return_annotation=ArtifactRef)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> ArtifactRef:
            ctx = TaskRunContext.get()
            if ctx is not None and ctx.task_run is not None:
                err = pop_key_error(ctx.task_run.id)
                if err is not None:
                    raise CacheKeyError(
                        f"cache key for {kind} v{version} could not be computed: {err!r}"
                    ) from err
            bound = task_sig.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            store = ArtifactStore(root) if root else default_store()
            refs, params = split_arguments(arguments)
            resolved = {name: store.resolve(ref) for name, ref in refs.items()}
            call_args = join_arguments(arguments, resolved)

            def build(out: Path) -> Any:
                return fn(**call_args, out=out)

            return store.get_or_build(kind, version, params, resolved, build, progress=_progress())

        run.__signature__ = task_sig  # type: ignore[attr-defined]
        del run.__wrapped__  # type: ignore[attr-defined]  # Prefect/inspect must see the signature without `out`
        run.artifact_kind = kind  # type: ignore[attr-defined]
        run.artifact_version = version  # type: ignore[attr-defined]
        run.build_fn = fn  # type: ignore[attr-defined]
        opts = dict(task_kwargs)
        opts.setdefault("version", str(version))
        return task(
            run,
            cache_policy=ArtifactCachePolicy(kind=kind, version=version, root=root),
            result_serializer="json",
            persist_result=True,
            **opts,
        )

    return decorate
