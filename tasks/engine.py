"""The engine artifact: a variant = weights + backend + build config, recorded as engine.json."""

from __future__ import annotations

from pathlib import Path

from artifacts import ArtifactRef
from artifacts.store import default_store
from artifacts.task import artifact_task
from mathforge.config import EngineSettings


@artifact_task(kind="engine", version=1, name="build-engine")
def build_engine(weights: ArtifactRef, variant: str, settings: EngineSettings, out: Path) -> None:
    from mathforge.engine.build import build_torch_engine

    build_torch_engine(
        default_store().path(weights), weights.model_dump(), variant, settings.model_dump(), out
    )
