"""The checkpoint artifact: a hub snapshot pinned to a commit, or a local directory, in the HF layout."""

from __future__ import annotations

from pathlib import Path

from artifacts.task import artifact_task
from tasks.sources import SourceSpec


@artifact_task(kind="checkpoint", version=1, name="checkpoint")
def checkpoint(source: SourceSpec, out: Path) -> None:
    from mathforge.checkpoint import materialize_checkpoint, resolve_model_source

    materialize_checkpoint(resolve_model_source(source.locator, source.revision), out)
