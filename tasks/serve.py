"""Serve a variant: start `mathforge serve` as a child process, wait for /health, always stop it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from artifacts import ArtifactRef
from artifacts.store import default_store
from mathforge import paths
from mathforge.config import EngineSettings
from mathforge.engine.build import load_engine
from mathforge.serving import ServerProcess, free_port, mathforge_argv


@dataclass
class Served:
    base_url: str  # OpenAI API root, e.g. http://127.0.0.1:8123/v1
    model: str
    pid: int | None
    log_file: Path


@contextmanager
def serve_variant(variant: str, engine: ArtifactRef, settings: EngineSettings) -> Iterator[Served]:
    store = default_store()
    spec = load_engine(store.path(engine))
    weights = store.resolve(ArtifactRef(**spec["weights"]))
    port = free_port()
    log_file = paths.runs_dir() / "logs" / f"serve-{variant}-{port}.log"
    argv = mathforge_argv(
        "serve",
        str(store.path(weights)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        variant,
        "--max-slots",
        str(settings.max_slots),
        "--max-model-len",
        str(settings.max_model_len),
        "--dtype",
        settings.dtype,
        "--device",
        settings.device,
    )
    with ServerProcess(
        argv,
        health_url=f"http://127.0.0.1:{port}/health",
        log_file=log_file,
        name=f"mathforge serve ({variant})",
    ) as proc:
        yield Served(base_url=f"http://127.0.0.1:{port}/v1", model=variant, pid=proc.pid, log_file=log_file)
