"""Build engine variants: checkpoint -> calibration -> FP8 -> engines. Every step is a cached artifact.

torch, trtllm/pytorch:  checkpoint ──────────────────────────────► engine (bf16)
                        checkpoint + calibration ─► fp8 checkpoint ─► engine (fp8)
trtllm (TensorRT):      checkpoint ─► TensorRT-LLM checkpoint (bf16) ─► engine (bf16)
                        checkpoint + calibration ─► TensorRT-LLM checkpoint (fp8) ─► engine (fp8)
                        TensorRT-LLM checkpoint (fp8) + drafter ─► engine (fp8+redrafter)
"""

from __future__ import annotations

from prefect import flow

from artifacts import ArtifactRef
from mathforge.backends.preflight import REDRAFTER, check_variants, require_build_host
from mathforge.backends.trtllm.recipes import checkpoint_recipe, engine_recipe
from mathforge.config import Preset, Variant, load_preset
from tasks.calibration import calibration
from tasks.engine import build_engine, build_trtllm_engine, import_drafter, resolve_drafter, trtllm_checkpoint
from tasks.model import checkpoint
from tasks.quantize import quantize_fp8
from tasks.sources import resolve_calibration, resolve_model


@flow(name="build-engines")
def build_engines(preset: str = "tiny", variants: list[Variant] | None = None) -> dict[str, ArtifactRef]:
    cfg = load_preset(preset)
    variants = check_variants(cfg, variants)  # refuse what cannot be built, before any work
    require_build_host(cfg, variants)
    ckpt = checkpoint(resolve_model(cfg.model))
    calib = None
    if any(v.startswith("fp8") for v in variants):
        c = cfg.calibration
        calib = calibration(ckpt, resolve_calibration(c), c.num_samples, c.seed, c.split, c.text_field)
    if cfg.engine.backend == "trtllm" and cfg.engine.trtllm.runtime == "trt":
        return tensorrt_engines(cfg, variants, ckpt, calib)
    weights = {"bf16": ckpt}
    if calib is not None:
        weights["fp8"] = quantize_fp8(ckpt, calib, cfg.calibration.num_samples, cfg.calibration.max_seq_len)
    return {v: build_engine(weights[v], v, cfg.engine) for v in variants}


def tensorrt_engines(
    cfg: Preset, variants: list[str], ckpt: ArtifactRef, calib: ArtifactRef | None
) -> dict[str, ArtifactRef]:
    trt_ckpt = {}
    if "bf16" in variants:
        trt_ckpt["bf16"] = trtllm_checkpoint(ckpt, None, checkpoint_recipe(cfg, "bf16"))
    if calib is not None:
        trt_ckpt["fp8"] = trtllm_checkpoint(ckpt, calib, checkpoint_recipe(cfg, "fp8"))
    drafter = import_drafter(resolve_drafter(cfg.drafter.checkpoint)) if REDRAFTER in variants else None
    return {
        v: build_trtllm_engine(
            ckpt,
            trt_ckpt["bf16" if v == "bf16" else "fp8"],
            drafter if v == REDRAFTER else None,
            engine_recipe(cfg, v),
        )
        for v in variants
    }
