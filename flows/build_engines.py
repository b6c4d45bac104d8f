"""Build engine variants: checkpoint -> calibration -> FP8 -> engines. Every step is a cached artifact."""

from __future__ import annotations

from prefect import flow

from artifacts import ArtifactRef
from mathforge.config import Variant, load_preset
from tasks.calibration import calibration
from tasks.engine import build_engine
from tasks.model import checkpoint
from tasks.quantize import quantize_fp8
from tasks.sources import resolve_calibration, resolve_model


@flow(name="build-engines")
def build_engines(preset: str = "tiny", variants: list[Variant] | None = None) -> dict[str, ArtifactRef]:
    cfg = load_preset(preset)
    variants = variants or cfg.variants
    ckpt = checkpoint(resolve_model(cfg.model))
    weights = {"bf16": ckpt}
    if "fp8" in variants:
        c = cfg.calibration
        calib = calibration(ckpt, resolve_calibration(c), c.num_samples, c.seed, c.split, c.text_field)
        weights["fp8"] = quantize_fp8(ckpt, calib, cfg.calibration.num_samples, cfg.calibration.max_seq_len)
    return {v: build_engine(weights[v], v, cfg.engine) for v in variants}
