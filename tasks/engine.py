"""Engine artifacts: a variant = weights + backend + build config, recorded as engine.json.

torch: engine.json describes the weights, and for `<weights>+redrafter` also the drafter (nothing is
compiled). trtllm: a TensorRT-LLM checkpoint (BF16 conversion or FP8 quantization) and a TensorRT engine per
variant, built by the generated commands on a host that has TensorRT-LLM; or, on its PyTorch runtime,
engine.json only (trtllm-serve loads checkpoints).
"""

from __future__ import annotations

from pathlib import Path

from artifacts import ArtifactRef
from artifacts.store import default_store
from artifacts.task import artifact_task
from mathforge.backends.trtllm.recipes import CheckpointRecipe, EngineRecipe
from mathforge.config import EngineSettings
from mathforge.errors import UserError
from tasks.serve import gpu_slot, task_log
from tasks.sources import SourceSpec


@artifact_task(kind="engine", version=1, name="build-engine")
def build_engine(weights: ArtifactRef, variant: str, settings: EngineSettings, out: Path) -> None:
    """torch, and trtllm on its PyTorch runtime: the weights are served as they are."""
    store = default_store()
    if settings.backend == "trtllm":
        from mathforge.backends.trtllm.build import describe_pytorch_engine

        describe_pytorch_engine(store.path(weights), weights.model_dump(), variant, settings.trtllm, out)
        return
    from mathforge.engine.build import build_torch_engine

    build_torch_engine(store.path(weights), weights.model_dump(), variant, settings.model_dump(), out)


@artifact_task(kind="engine", version=1, name="build-speculative-engine")
def build_speculative_engine(
    weights: ArtifactRef,
    drafter: ArtifactRef,
    variant: str,
    settings: EngineSettings,
    draft_len: int,
    out: Path,
) -> None:
    """torch: weights + a ReDrafter drafter (`<weights>+redrafter`), described in engine.json. Its own task
    (not a `drafter` argument of build-engine) so the keys of the plain engines never change with it."""
    from mathforge.engine.build import build_torch_engine

    if settings.backend != "torch":
        from mathforge.backends.preflight import TRTLLM_BF16_REDRAFTER

        if variant.startswith("bf16"):
            raise UserError(TRTLLM_BF16_REDRAFTER)
        raise UserError(
            f"{variant} on the trtllm backend is a TensorRT engine (build-trtllm-engine), not this task"
        )
    store = default_store()
    build_torch_engine(
        store.path(weights),
        weights.model_dump(),
        variant,
        settings.model_dump(),
        out,
        drafter=(store.path(drafter), drafter.model_dump()),
        draft_len=draft_len,
    )


@artifact_task(kind="trtllm-checkpoint", version=1, name="trtllm-checkpoint")
def trtllm_checkpoint(
    checkpoint: ArtifactRef, calibration: ArtifactRef | None, recipe: CheckpointRecipe, out: Path
) -> dict:
    """HF checkpoint -> TensorRT-LLM checkpoint: `convert_checkpoint.py` (bf16) or `quantize.py` (fp8, with
    the calibration artifact's `data/` directory as the calibration dataset)."""
    from mathforge.backends.trtllm.build import build_checkpoint

    store = default_store()
    calib_dir = None if calibration is None else store.path(calibration) / "data"
    with gpu_slot(recipe.tp_size, f"{recipe.precision} TensorRT-LLM checkpoint"):
        return build_checkpoint(recipe, store.path(checkpoint), calib_dir, out, task_log())


@artifact_task(kind="engine", version=1, name="build-trtllm-engine")
def build_trtllm_engine(
    checkpoint: ArtifactRef,
    trtllm_checkpoint: ArtifactRef,
    drafter: ArtifactRef | None,
    recipe: EngineRecipe,
    out: Path,
) -> None:
    """TensorRT-LLM checkpoint (+ drafter: ReDrafter conversion first) -> TensorRT engine via trtllm-build."""
    from mathforge.backends.trtllm.build import build_engine as build

    store = default_store()
    with gpu_slot(recipe.tp_size, f"{recipe.variant} engine build"):
        build(
            recipe,
            hf_dir=store.path(checkpoint),
            checkpoint_dir=store.path(trtllm_checkpoint),
            drafter_dir=None if drafter is None else store.path(drafter),
            out=out,
            refs={
                "weights": checkpoint.model_dump(),
                "trtllm_checkpoint": trtllm_checkpoint.model_dump(),
                "drafter": None if drafter is None else drafter.model_dump(),
            },
            log=task_log(),
        )


@artifact_task(kind="drafter", version=1, name="import-drafter")
def import_drafter(source: SourceSpec, out: Path) -> None:
    """A trained ReDrafter directory (Apple layout) into the store, checked as the converter needs it: the
    preset's drafter.checkpoint, used instead of training one (torch) and as the trtllm backend's drafter."""
    import shutil

    from mathforge.backends.trtllm.build import check_drafter
    from mathforge.hub import tree_digest

    src = Path(source.locator)
    check_drafter(src)
    if tree_digest(src) != source.fingerprint.get("digest"):
        raise RuntimeError(f"drafter {src} changed since it was resolved; re-run to pick up the new content")
    shutil.copytree(src, out, dirs_exist_ok=True)


def resolve_drafter(checkpoint: str) -> SourceSpec:
    """Key a drafter directory by its content (the path only says where to read it)."""
    from mathforge.hub import tree_digest

    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise UserError(f"drafter.checkpoint {checkpoint} is not a directory")
    return SourceSpec(fingerprint={"kind": "local", "digest": tree_digest(path)}, locator=str(path.resolve()))
