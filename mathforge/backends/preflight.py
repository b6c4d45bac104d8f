"""Before a build starts: can this preset's variants be built here? Refuse at once, with the way out.

The same rules the build tasks enforce, checked before the first (possibly 28 GB) download.

Speculative variants: on torch, `bf16+redrafter` and `fp8+redrafter` decode with a drafter the pipeline
trains (or imports from drafter.checkpoint); on trtllm, `fp8+redrafter` is a TensorRT engine with an
imported drafter (drafter.checkpoint) and `bf16+redrafter` does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence

from mathforge.config import VARIANTS, Preset
from mathforge.errors import UserError

REDRAFTER = "fp8+redrafter"  # the speculative variant TensorRT-LLM builds (the reference recipe's)
SPECULATIVE_SUFFIX = "+redrafter"

TRTLLM_BF16_REDRAFTER = (
    "variant bf16+redrafter is built by the torch backend only: on TensorRT-LLM the speculative variant is "
    "fp8+redrafter (the reference recipe's FP8 engine with the ReDrafter drafter). Choose fp8+redrafter, or "
    "engine.backend: torch"
)


def is_speculative(variant: str) -> bool:
    """`<weights>+redrafter`: the weights decode speculatively with the preset's drafter."""
    return variant.endswith(SPECULATIVE_SUFFIX)


def weights_of(variant: str) -> str:
    """The weights a variant serves: bf16 (the checkpoint) or fp8 (the calibrated FP8 checkpoint)."""
    return variant.removesuffix(SPECULATIVE_SUFFIX)


def check_variants(preset: Preset, variants: Sequence[str] | None = None) -> list[str]:
    """The variants to build (the preset's when none are given), or a UserError for one that cannot be."""
    chosen = list(variants or preset.variants)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not chosen:
        raise UserError(f"preset {preset.name} names no variants")
    speculative = [v for v in chosen if is_speculative(v)]
    if speculative and preset.engine.backend == "torch":
        from mathforge.engine.speculative import MAX_DRAFT_LEN

        d = preset.drafter
        if d.num_beams != 1:
            raise UserError(
                f"drafter.num_beams is {d.num_beams}, but the torch backend drafts one beam (greedy, as the "
                "reference recipe serves ReDrafter: num_beams 1); set drafter.num_beams: 1"
            )
        if d.draft_len > MAX_DRAFT_LEN:
            raise UserError(
                f"drafter.draft_len {d.draft_len} is above the torch engine's limit {MAX_DRAFT_LEN}"
            )
    if preset.engine.backend == "trtllm":
        if "int8_wo" in chosen:
            raise UserError(
                "variant int8_wo is built by the torch backend (engine.backend: torch); the trtllm presets "
                "build bf16, fp8 and fp8+redrafter"
            )
        if "bf16+redrafter" in chosen:
            raise UserError(TRTLLM_BF16_REDRAFTER)
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
