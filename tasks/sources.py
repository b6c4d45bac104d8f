"""Resolve what the user named (a model, a calibration set) into a fingerprint of its content.

The fingerprint goes into recipe keys; the locator (a path, a repo id) only says where to read from,
so moving a directory or re-downloading the same revision never invalidates anything.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from pydantic import BaseModel, Field

from mathforge.config import CalibrationSettings, ModelSettings


class SourceSpec(BaseModel):
    fingerprint: dict[str, Any]
    locator: str = Field(exclude=True)  # excluded from model_dump, hence from every recipe key
    revision: str | None = Field(default=None, exclude=True)


@task(name="resolve-model-source")
def resolve_model(settings: ModelSettings) -> SourceSpec:
    from mathforge.checkpoint import resolve_model_source

    source = resolve_model_source(settings.locator(), settings.revision)
    # the resolved commit, not the user's branch name: the build reads exactly what the key says
    return SourceSpec(fingerprint=source.fingerprint(), locator=settings.locator(), revision=source.commit)


@task(name="resolve-calibration-source")
def resolve_calibration(settings: CalibrationSettings) -> SourceSpec:
    from mathforge.data.calibration import source_fingerprint

    fingerprint = source_fingerprint(settings.source, revision=settings.revision, split=settings.split)
    return SourceSpec(fingerprint=fingerprint, locator=settings.source, revision=fingerprint.get("commit"))
