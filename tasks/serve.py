"""Serve a variant: start its server as a child process, wait for /health, always stop it.

torch engines run `mathforge serve` (with `--drafter` for a speculative variant); trtllm engines run `trtllm-serve` (TensorRT engine with `--backend trt`,
or a checkpoint on the PyTorch backend with its `extra_llm_api_options` YAML). Both give the same `Served`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts import ArtifactRef
from artifacts.store import default_store
from mathforge import paths
from mathforge.config import EngineSettings, TrtllmSettings
from mathforge.engine.build import load_engine
from mathforge.serving import ServerProcess, free_port, mathforge_argv

# Per-host GPU slots (reference prefect_mlflow.md §2.6): with MATHFORGE_GPU_HOST=<host> (`auto`: this
# machine's hostname) every GPU section takes as many slots of the global concurrency limit `gpu:<host>`
# (create it with the host's GPU count) as it uses GPUs; unset, nothing is limited (a laptop, CI).
GPU_HOST_ENV = "MATHFORGE_GPU_HOST"


@dataclass
class Served:
    base_url: str  # OpenAI API root, e.g. http://127.0.0.1:8123/v1
    model: str
    pid: int | None
    log_file: Path


def task_log() -> Callable[[str], Any]:
    """Prefect's run logger inside a run (lines show in the UI), else the module logger."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            return get_run_logger().info
    except Exception:  # pragma: no cover - logging must never break a build
        pass
    return logging.getLogger("mathforge.trtllm").info


@contextmanager
def gpu_slot(gpus: int, what: str) -> Iterator[None]:
    """Hold `gpus` slots of this host's `gpu:<host>` limit while the block runs (see GPU_HOST_ENV)."""
    host = os.environ.get(GPU_HOST_ENV, "").strip()
    if not host:
        yield
        return
    if host == "auto":  # a container on the host's network (prefect.yaml gpu-h100-docker)
        host = socket.gethostname()
    from prefect.concurrency.sync import concurrency

    task_log()(f"{what}: waiting for {gpus} GPU slot(s) of gpu:{host}")
    # strict: a missing limit is an error, not silently unlimited; long builds renew their lease and must
    # not die on one failed renewal
    with concurrency(
        f"gpu:{host}", occupy=gpus, strict=True, lease_duration=600, raise_on_lease_renewal_failure=False
    ):
        yield


@contextmanager
def serve_variant(variant: str, engine: ArtifactRef, settings: EngineSettings) -> Iterator[Served]:
    store = default_store()
    engine_dir = store.path(store.resolve(engine))
    spec = load_engine(engine_dir)
    if spec.get("backend") == "trtllm":
        with _serve_trtllm(variant, engine_dir, spec, settings) as served:
            yield served
        return
    weights = store.resolve(ArtifactRef(**spec["weights"]))
    port = free_port()
    log_file = paths.runs_dir() / "logs" / f"serve-{variant}-{port}.log"
    argv = torch_serve_argv(variant, store.path(weights), port, settings, speculative_args(spec))
    with (
        gpu_slot(1, f"serve {variant}") if settings.device.startswith("cuda") else nullcontext(),
        ServerProcess(
            argv,
            health_url=f"http://127.0.0.1:{port}/health",
            log_file=log_file,
            name=f"mathforge serve ({variant})",
        ) as proc,
    ):
        yield Served(base_url=f"http://127.0.0.1:{port}/v1", model=variant, pid=proc.pid, log_file=log_file)


def speculative_args(spec: dict) -> list[str]:
    """`--drafter DIR --draft-len K` for an engine that names a drafter (a `<weights>+redrafter` variant)."""
    if not spec.get("drafter"):
        return []
    store = default_store()
    drafter = store.path(store.resolve(ArtifactRef(**spec["drafter"])))
    return ["--drafter", str(drafter), "--draft-len", str(spec["speculative"]["draft_len"])]


def torch_serve_argv(
    variant: str, weights_dir: Path | str, port: int | str, settings: EngineSettings, extra: list[str]
) -> list[str]:
    """The `mathforge serve` command line of a torch engine (also what the dry-run plan prints)."""
    return mathforge_argv(
        "serve",
        str(weights_dir),
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
        *extra,
    )


@contextmanager
def _serve_trtllm(variant: str, engine_dir: Path, spec: dict, settings: EngineSettings) -> Iterator[Served]:
    from mathforge.backends.trtllm import commands as cmds
    from mathforge.backends.trtllm.host import require_trtllm
    from mathforge.backends.trtllm.llmapi import llm_api_options_yaml

    # serve-time choices (memory fraction, where the tools are) from the preset; shapes from the engine
    trt = settings.trtllm or TrtllmSettings(version=spec["trtllm_version"])
    version, tp_size = spec["trtllm_version"], int(spec["tp_size"])
    require_trtllm(
        version=version,
        image=trt.container_image,
        python=trt.python,
        tools=["trtllm-serve"],
        tp_size=tp_size,
        what=f"serving {variant}",
    )
    port = free_port()
    logs = paths.runs_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"trtllm-serve-{variant}-{port}.log"
    build = spec["build"]
    if spec["runtime"] == "trt":
        model = str(engine_dir)
        command = cmds.serve(
            model,
            runtime="trt",
            version=version,
            tp_size=tp_size,
            max_batch_size=int(build["max_batch_size"]),
            kv_cache_free_gpu_memory_fraction=trt.kv_cache_free_gpu_memory_fraction,
            host="127.0.0.1",
            port=port,
            tokenizer=str(engine_dir),  # the tokenizer files were copied beside the engine
        )
    else:
        store = default_store()
        model = str(store.path(store.resolve(ArtifactRef(**spec["weights"]))))
        options = logs / f"trtllm-serve-{variant}-{port}.yaml"
        options.write_text(llm_api_options_yaml(_settings_of(build, trt)))
        command = cmds.serve(
            model,
            runtime="pytorch",
            version=version,
            tp_size=tp_size,
            max_batch_size=int(build["max_batch_size"]),
            max_num_tokens=int(build["max_num_tokens"]),
            max_seq_len=int(build["max_seq_len"]),
            kv_cache_free_gpu_memory_fraction=trt.kv_cache_free_gpu_memory_fraction,
            host="127.0.0.1",
            port=port,
            extra_llm_api_options=str(options),
        )
    task_log()(f"serve {variant}: $ {command}")
    with (
        gpu_slot(tp_size, f"serve {variant}"),
        ServerProcess(
            command.to_list(),
            health_url=f"http://127.0.0.1:{port}/health",
            log_file=log_file,
            startup_timeout=trt.startup_timeout_s,
            name=f"trtllm-serve ({variant})",
        ) as proc,
    ):
        # trtllm-serve names the model after the directory it loaded (reference §4, /v1/models)
        yield Served(
            base_url=f"http://127.0.0.1:{port}/v1", model=Path(model).name, pid=proc.pid, log_file=log_file
        )


def _settings_of(build: dict, trt: TrtllmSettings) -> TrtllmSettings:
    """The engine's recorded build settings plus this preset's host / serve-time fields (the excluded ones,
    which a recipe and so engine.json's build record never carry)."""
    fields = TrtllmSettings.model_fields
    recorded = {k: v for k, v in build.items() if k in fields and not fields[k].exclude}
    host = {k: getattr(trt, k) for k, f in fields.items() if f.exclude}
    return TrtllmSettings.model_validate({**recorded, **host})
