"""The content-addressed artifact store and the Prefect cache policy built on the same keys.

Import-light: `artifacts` itself does not import Prefect; `artifact_task` and `ArtifactCachePolicy` are
loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from artifacts.keys import (
    ArtifactRef,
    RecipeParamError,
    canonical_json,
    canonicalize,
    content_digest,
    recipe_key,
)
from artifacts.store import (
    AmbiguousPrefix,
    ArtifactInfo,
    ArtifactMissing,
    ArtifactStore,
    GcReport,
    Problem,
    default_store,
    store_root,
)

if TYPE_CHECKING:
    from artifacts.prefect_cache import ArtifactCachePolicy, CacheKeyError
    from artifacts.task import artifact_task

_LAZY = {
    "artifact_task": "artifacts.task",
    "ArtifactCachePolicy": "artifacts.prefect_cache",
    "CacheKeyError": "artifacts.prefect_cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'artifacts' has no attribute {name!r}")


__all__ = [
    "AmbiguousPrefix",
    "ArtifactCachePolicy",
    "ArtifactInfo",
    "ArtifactMissing",
    "ArtifactRef",
    "ArtifactStore",
    "CacheKeyError",
    "GcReport",
    "Problem",
    "RecipeParamError",
    "artifact_task",
    "canonical_json",
    "canonicalize",
    "content_digest",
    "default_store",
    "recipe_key",
    "store_root",
]
