"""Where mathforge keeps its state: everything under one MATHFORGE_HOME (default ./.mathforge)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("MATHFORGE_HOME", ".mathforge")).expanduser().resolve()


def runs_dir() -> Path:
    """Per-pipeline-run outputs (benchmark JSON, logs) that are measurements, not artifacts."""
    path = home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path
