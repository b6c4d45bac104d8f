"""Before a build starts: can this preset's variants be built here? Refuse at once, with the way out.

The same rules the build tasks enforce, checked before the first (possibly 28 GB) download.
"""

from __future__ import annotations

from collections.abc import Sequence

from mathforge.config import VARIANTS, Preset
from mathforge.errors import UserError

REDRAFTER = "fp8+redrafter"

TORCH_REDRAFTER_UNAVAILABLE = (
    "variant fp8+redrafter is not yet available on the torch backend: ReDrafter training and speculative "
    "decoding for it are still being built (issue 5). Build it with engine.backend: trtllm and a trained "
    "drafter (drafter.checkpoint), or choose the variants bf16, fp8 (--variants bf16,fp8)"
)
DRAFTER_UNAVAILABLE = (
    "variant fp8+redrafter needs a drafter, and training one in the pipeline is not yet available (issue 5): "
    "set drafter.checkpoint in the preset to a trained ReDrafter directory (Apple layout: config.json + one "
    "model.safetensors, e.g. from NeMo-Skills' train_redrafter), or leave the variant out (--variants bf16,fp8)"
)


def check_variants(preset: Preset, variants: Sequence[str] | None = None) -> list[str]:
    """The variants to build (the preset's when none are given), or a UserError for one that cannot be."""
    chosen = list(variants or preset.variants)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not chosen:
        raise UserError(f"preset {preset.name} names no variants")
    if REDRAFTER in chosen:
        if preset.engine.backend == "torch":
            raise UserError(TORCH_REDRAFTER_UNAVAILABLE)
        if preset.drafter.checkpoint is None:
            raise UserError(DRAFTER_UNAVAILABLE)
    if preset.engine.backend == "trtllm":
        from mathforge.backends.trtllm import recipes

        for v in chosen:  # version gates and shape checks, before anything runs
            if preset.engine.trtllm.runtime == "trt":
                recipes.engine_recipe(preset, v)
            elif v == REDRAFTER:
                raise UserError(
                    "variant fp8+redrafter needs TensorRT engines (engine.trtllm.runtime: trt): the PyTorch "
                    "backend has no ReDrafter decoding_type; use engine.trtllm.speculative there"
                )
    return chosen


def require_build_host(preset: Preset, variants: Sequence[str]) -> None:
    """trtllm engines: TensorRT-LLM, its tools and examples must be on this host (named image otherwise)."""
    t = preset.engine.trtllm
    if preset.engine.backend != "trtllm" or t is None or t.runtime != "trt":
        return
    from mathforge.backends.trtllm import commands as cmds
    from mathforge.backends.trtllm.host import require_trtllm

    scripts = []
    if "bf16" in variants and t.model_type:
        scripts.append(cmds.CONVERT_SCRIPTS[t.model_type])
    if any(v.startswith("fp8") for v in variants):
        scripts.append(cmds.QUANTIZE_SCRIPT)
    if REDRAFTER in variants:
        scripts.append(cmds.REDRAFTER_SCRIPT)
    require_trtllm(
        version=t.version,
        image=t.container_image,
        python=t.python,
        tools=["trtllm-build", "trtllm-serve"],
        scripts=scripts,
        examples_dir=t.examples_dir,
        tp_size=t.tp_size,
        what=f"building {preset.name}'s TensorRT engines",
    )
