"""Does this host have the TensorRT-LLM a step needs? Checked before anything runs, with a way out.

TensorRT-LLM lives in NVIDIA's release container, usually beside (not inside) mathforge's own environment:
the check asks the configured interpreter (`engine.trtllm.python`) for the installed `tensorrt_llm`
version, looks for the tools on PATH and the example scripts in `engine.trtllm.examples_dir`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import PurePosixPath

from mathforge.backends.trtllm import versions
from mathforge.errors import UserError

_VERSION_PROBE = "import importlib.metadata as m; print(m.version('tensorrt_llm'))"


def installed_version(python: str) -> str | None:
    """The tensorrt_llm version `python` sees (from its package metadata: no heavy import), or None."""
    exe = shutil.which(python)
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "-c", _VERSION_PROBE], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[-1].strip() if proc.returncode == 0 and lines else None


def visible_gpus() -> int | None:
    """GPUs this process may use according to CUDA_VISIBLE_DEVICES (None when it is not set)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return len([d for d in value.split(",") if d.strip() and d.strip() != "-1"])


def require_trtllm(
    *,
    version: str,
    image: str,
    python: str,
    tools: Iterable[str] = (),
    scripts: Iterable[str] = (),
    examples_dir: str | None = None,
    tp_size: int = 1,
    what: str = "this step",
) -> str:
    """Raise a UserError naming the container image unless TensorRT-LLM `version` (same major.minor) is
    installed with the given tools and example scripts, and enough GPUs are visible. Returns the installed
    version (recorded in engine.json)."""
    hint = (
        f"run it on a GPU worker in NVIDIA's TensorRT-LLM container {image} (infra/gpu-worker.Dockerfile "
        "builds mathforge into it; docs/trtllm.md), or use engine.backend: torch"
    )
    installed = installed_version(python)
    if installed is None:
        raise UserError(
            f"{what} needs TensorRT-LLM {version}, but `{python}` on this host has no tensorrt_llm: {hint}"
        )
    if versions.parse_version(installed)[:2] != versions.parse_version(version)[:2]:
        raise UserError(
            f"{what} was generated for TensorRT-LLM {version}, but this host has {installed}: {hint} "
            f"(or set engine.trtllm.version: {installed} to generate for the installed release)"
        )
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if examples_dir is not None:
        missing += [
            str(PurePosixPath(examples_dir) / s)
            for s in scripts
            if not os.path.isfile(PurePosixPath(examples_dir) / s)
        ]
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}, which this host does not have: {hint}")
    gpus = visible_gpus()
    if gpus is not None and gpus < tp_size:
        raise UserError(
            f"{what} runs with tensor parallel size {tp_size} but CUDA_VISIBLE_DEVICES gives {gpus} GPU(s); "
            "set the work pool's job variables (env.CUDA_VISIBLE_DEVICES, env.MATHFORGE_TP_SIZE) to match"
        )
    return installed
