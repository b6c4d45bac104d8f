"""Build engine variants: checkpoint -> calibration -> FP8 -> drafter -> engines. Every step is a cached artifact.

torch, trtllm/pytorch:  checkpoint ──────────────────────────────► engine (bf16)
                        checkpoint + calibration ─► fp8 checkpoint ─► engine (fp8)
torch:                  checkpoint ─► int8 weight-only checkpoint ─► engine (int8_wo)
torch:                  checkpoint + drafter data ─► drafter (trained; or drafter.checkpoint imported)
                        checkpoint + drafter ─► engine (bf16+redrafter)
                        fp8 checkpoint + drafter ─► engine (fp8+redrafter)
trtllm (TensorRT):      checkpoint ─► TensorRT-LLM checkpoint (bf16) ─► engine (bf16)
                        checkpoint + calibration ─► TensorRT-LLM checkpoint (fp8) ─► engine (fp8)
                        TensorRT-LLM checkpoint (fp8) + drafter ─► engine (fp8+redrafter)

The drafter is trained once per base checkpoint (on the BF16 model's hidden states) and shared by both
speculative variants; its recipe key includes its training data's fingerprint, so new data rebuilds the
drafter and the speculative engines only.
"""

from __future__ import annotations

from prefect import flow

from artifacts import ArtifactRef
from mathforge.backends.preflight import (
    REDRAFTER,
    check_variants,
    is_speculative,
    require_build_host,
    weights_of,
)
from mathforge.backends.trtllm.recipes import checkpoint_recipe, engine_recipe
from mathforge.config import Preset, Variant, load_preset
from tasks.calibration import calibration
from tasks.engine import (
    build_engine,
    build_speculative_engine,
    build_trtllm_engine,
    import_drafter,
    resolve_drafter,
    trtllm_checkpoint,
)
from tasks.model import checkpoint
from tasks.quantize import quantize_fp8, quantize_int8
from tasks.sources import resolve_calibration, resolve_model


@flow(name="build-engines")
def build_engines(preset: str = "tiny", variants: list[Variant] | None = None) -> dict[str, ArtifactRef]:
    cfg = load_preset(preset)
    variants = check_variants(cfg, variants)  # refuse what cannot be built, before any work
    require_build_host(cfg, variants)
    ckpt = checkpoint(resolve_model(cfg.model))
    calib = None
    if any(weights_of(v) == "fp8" for v in variants):
        c = cfg.calibration
        calib = calibration(ckpt, resolve_calibration(c), c.num_samples, c.seed, c.split, c.text_field)
    if cfg.engine.backend == "trtllm" and cfg.engine.trtllm.runtime == "trt":
        return tensorrt_engines(cfg, variants, ckpt, calib)
    weights = {"bf16": ckpt}
    if calib is not None:
        weights["fp8"] = quantize_fp8(ckpt, calib, cfg.calibration.num_samples, cfg.calibration.max_seq_len)
    if "int8_wo" in variants:  # weight-only: no calibration
        weights["int8_wo"] = quantize_int8(ckpt)
    drafter = torch_drafter(cfg, ckpt) if any(is_speculative(v) for v in variants) else None
    engines = {}
    for v in variants:
        if is_speculative(v):
            engines[v] = build_speculative_engine(
                weights[weights_of(v)], drafter, v, cfg.engine, cfg.drafter.draft_len
            )
        else:
            engines[v] = build_engine(weights[v], v, cfg.engine)
    return engines


def torch_drafter(cfg: Preset, ckpt: ArtifactRef) -> ArtifactRef:
    """The preset's drafter: drafter.checkpoint imported as is, else trained on the drafter data (with
    PyTorch on the build host, for either backend: TensorRT-LLM converts the trained drafter)."""
    if cfg.drafter.checkpoint is not None:
        return import_drafter(resolve_drafter(cfg.drafter.checkpoint))
    from tasks.drafter import resolve_drafter_data, train_drafter

    return train_drafter(ckpt, resolve_drafter_data(cfg.drafter), cfg.drafter)


def tensorrt_engines(
    cfg: Preset, variants: list[str], ckpt: ArtifactRef, calib: ArtifactRef | None
) -> dict[str, ArtifactRef]:
    trt_ckpt = {}
    if "bf16" in variants:
        trt_ckpt["bf16"] = trtllm_checkpoint(ckpt, None, checkpoint_recipe(cfg, "bf16"))
    if calib is not None:
        trt_ckpt["fp8"] = trtllm_checkpoint(ckpt, calib, checkpoint_recipe(cfg, "fp8"))
    drafter = torch_drafter(cfg, ckpt) if REDRAFTER in variants else None
    return {
        v: build_trtllm_engine(
            ckpt,
            trt_ckpt["bf16" if v == "bf16" else "fp8"],
            drafter if v == REDRAFTER else None,
            engine_recipe(cfg, v),
        )
        for v in variants
    }
