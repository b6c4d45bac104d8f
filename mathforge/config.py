"""Presets: the YAML files in configs/ (or any path) validated into typed settings.

A preset is the one place a user edits to point mathforge at another model, data set or machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mathforge.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO_ROOT / "configs"
EMBEDDED_MODELS = {"tiny": Path(__file__).resolve().parent / "data" / "tiny_model"}

# `<weights>+redrafter`: those weights decoding speculatively with the preset's ReDrafter drafter
Variant = Literal["bf16", "fp8", "int8_wo", "bf16+redrafter", "fp8+redrafter"]
VARIANTS: tuple[str, ...] = ("bf16", "fp8", "int8_wo", "bf16+redrafter", "fp8+redrafter")

# The TensorRT-LLM release the trtllm backend generates commands for, and NVIDIA's release container that
# ships it. 1.1.0rc0 is the release the reference recipe (NeMo-Skills AIMO-2 tutorial) built and measured
# FP8 + ReDrafter with; 1.1.x/1.2.x keep the engine flow, 1.3 removed it (reference trtllm_redrafter.md §0, §8.1).
TRTLLM_VERSION = "1.1.0rc0"
TRTLLM_IMAGE_REPO = "nvcr.io/nvidia/tensorrt-llm/release"
TRTLLM_EXAMPLES_DIR = "/app/tensorrt_llm/examples"  # where the release container installs the examples


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    source: str
    revision: str | None = None

    def locator(self) -> str:
        """Where the checkpoint really is: `embedded:NAME` maps to the shipped directory."""
        if self.source.startswith("embedded:"):
            name = self.source.split(":", 1)[1]
            if name not in EMBEDDED_MODELS:
                raise UserError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
            return str(EMBEDDED_MODELS[name])
        return self.source


class CalibrationSettings(_Strict):
    source: str = "tiny"
    split: str | None = None
    revision: str | None = None
    text_field: str | None = None
    num_samples: int = Field(32, gt=0)
    seed: int = 0
    max_seq_len: int = Field(512, gt=0)


class SpeculativeSettings(_Strict):
    """trtllm-serve's PyTorch-backend `speculative_config` (ReDrafter has none there: it is the
    `fp8+redrafter` variant on TensorRT engines)."""

    decoding_type: Literal["Eagle3", "DraftTarget", "NGram"]
    max_draft_len: int = Field(3, gt=0)
    speculative_model: str | None = None  # Eagle3 head / draft model (HF id or path); NGram needs none
    max_matching_ngram_size: int | None = Field(None, gt=0)  # NGram only

    @model_validator(mode="after")
    def _model_needed(self) -> SpeculativeSettings:
        if self.decoding_type != "NGram" and not self.speculative_model:
            raise ValueError(
                f"decoding_type {self.decoding_type} needs speculative_model (the draft weights)"
            )
        if self.decoding_type != "NGram" and self.max_matching_ngram_size is not None:
            raise ValueError("max_matching_ngram_size applies to decoding_type NGram only")
        return self


class TrtllmSettings(_Strict):
    """How the trtllm backend builds and serves. Fields marked `exclude` say where things are on a host
    (or only affect serving): they are left out of every recipe key, so an engine built on one host is the
    same artifact on another, and changing a serve flag never rebuilds an engine."""

    version: str = TRTLLM_VERSION  # the commands are generated for this release; a host must have it
    image: str | None = Field(None, exclude=True)  # None: the release container of `version`
    examples_dir: str = Field(TRTLLM_EXAMPLES_DIR, exclude=True)
    python: str = Field("python3", exclude=True)  # the interpreter that has tensorrt_llm (runs examples/)
    runtime: Literal["trt", "pytorch"] = "trt"  # TensorRT engines (trtllm-build) or the PyTorch backend
    model_type: Literal["qwen", "llama"] | None = None  # examples/models/core/<type>; None: from config.json
    tp_size: int = Field(1, gt=0)
    max_batch_size: int = Field(32, gt=0)
    max_input_len: int = Field(4096, gt=0)
    max_seq_len: int = Field(8192, gt=0)
    max_num_tokens: int = Field(8192, gt=0)
    calib_batch_size: int = Field(4, gt=0)  # quantize.py --batch_size (the recipe's 4)
    kv_cache_dtype: Literal["fp8"] | None = None  # None: the KV cache stays BF16, as in the recipe
    speculative: SpeculativeSettings | None = None  # runtime pytorch only
    kv_cache_free_gpu_memory_fraction: float = Field(0.9, gt=0, le=1, exclude=True)
    startup_timeout_s: float = Field(1800.0, gt=0, exclude=True)  # loading a 14B engine takes minutes

    @model_validator(mode="after")
    def _consistent(self) -> TrtllmSettings:
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len {self.max_input_len} exceeds max_seq_len {self.max_seq_len}")
        if self.speculative is not None and self.runtime != "pytorch":
            raise ValueError(
                "speculative applies to runtime pytorch (trtllm-serve --backend pytorch); on TensorRT engines "
                "speculative decoding is the fp8+redrafter variant"
            )
        return self

    @property
    def container_image(self) -> str:
        return self.image or f"{TRTLLM_IMAGE_REPO}:{self.version}"


class EngineSettings(_Strict):
    backend: Literal["torch", "trtllm"] = "torch"
    device: str = "cpu"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_slots: int = Field(8, gt=0)
    max_model_len: int = Field(2048, gt=0)
    # None for the torch backend, so trtllm defaults never enter torch engines' recipe keys
    trtllm: TrtllmSettings | None = None

    @model_validator(mode="after")
    def _trtllm_defaults(self) -> EngineSettings:
        if self.backend == "trtllm" and self.trtllm is None:
            self.trtllm = TrtllmSettings()
        return self


class DrafterSettings(_Strict):
    """ReDrafter: a small recurrent drafter proposes tokens that the base model verifies in one pass.

    The pipeline trains it (mathforge/drafter/train.py, Apple's recipe as NeMo-Skills' train_redrafter runs
    it): the base frozen, `draft_len` heads, on a dataset of problems + solutions (`data_mode: solutions`) or
    on the base's own greedy generations for the problems (`generations`). `checkpoint` instead names a
    drafter trained elsewhere (Apple's layout: config.json + one model.safetensors), which the trtllm path
    imports as is.

    Fields marked `exclude` say where things are or only matter when decoding: they stay out of the trained
    drafter's recipe key (changing num_beams never retrains it); whatever decodes reads them explicitly.
    """

    checkpoint: str | None = Field(None, exclude=True)  # a pre-trained drafter directory: no training
    num_draft_layers: int = Field(2, gt=0)  # ResBlocks in the drafter's head
    draft_len: int = Field(3, gt=0)  # tokens drafted per step: training's predict_n_tokens, TRT's draft_len
    num_beams: int = Field(1, gt=0, exclude=True)
    greedy_search: bool = Field(True, exclude=True)
    rnn: bool = True

    # training data (mathforge/drafter/data.py)
    data_mode: Literal["solutions", "generations"] = "solutions"
    data_source: str = "tiny"  # `tiny` (the synthetic generator), a HF dataset id, or a local .jsonl/.parquet
    data_split: str | None = None  # a HF split (`tir`), or a local file's `split` column; not for tiny
    data_revision: str | None = None  # HF datasets only: branch, tag or commit (resolved to a commit sha)
    data_nrows: int | None = Field(None, gt=0)  # the first N rows (tiny: N generated problems, default 2000)
    prompt: Literal["tir", "math", "raw"] = "tir"  # user turn: openmath/tir, generic/math, or the problem
    system: str | None = None  # a system turn (NeMo-Skills' train_redrafter sends ""); None: no system turn
    generation_max_tokens: int = Field(1024, gt=0)  # data_mode generations: the base's budget per problem
    # held-out evaluation (the same metric names, plus the simulated acceptance length)
    eval_source: str = "tiny"  # `tiny` (the shipped problems) or a local .jsonl/.parquet
    eval_split: str | None = "test"
    eval_nrows: int | None = Field(None, gt=0)

    # training hyper-parameters (Apple's recipe: AdamW, linear warm-up, cosine decay)
    epochs: float = Field(1.0, gt=0)
    steps: int | None = Field(None, gt=0)  # overrides epochs
    batch_size: int = Field(8, gt=0)  # sequences per optimizer step
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_len: int = Field(2048, gt=1)  # longer rows are truncated (model_max_length)
    seed: int = 0
    top_k: int = Field(5, gt=0)  # metrics redrafter{i}_top1..top_k
    device: str | None = Field(None, exclude=True)  # None: cuda when available, else cpu


class BenchSettings(_Strict):
    problems: str = "tiny"
    split: str | None = "test"
    num_prompts: int = Field(16, gt=0)
    concurrency: list[int] = Field(default_factory=lambda: [1, 4])
    max_tokens: int = Field(32, gt=0)
    warmup: int = Field(2, ge=0)

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("concurrency must be a non-empty list of positive integers")
        return v


class EvaluateSettings(_Strict):
    """How each variant is evaluated: NeMo-Skills-style tool-integrated solving with early stopping."""

    problems: str = "tiny"
    split: str | None = "test"
    num_problems: int | None = Field(None, gt=0)  # the first N problems of the split; None = all
    samples: int = Field(1, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    tokens_to_generate: int = Field(512, gt=0)
    tools: bool = True
    max_code_executions: int = Field(8, ge=0)
    code_execution_timeout: float = Field(10.0, gt=0)
    stop_after_n_completed: int | None = Field(None, gt=0)
    stop_after_n_seconds: float | None = Field(None, gt=0)
    stop_after_n_same_answer: int | None = Field(None, gt=0)
    time_budget_s: float | None = Field(None, gt=0)
    concurrent_problems: int = Field(4, gt=0)


class TrackingSettings(_Strict):
    experiment: str | None = None


class Preset(_Strict):
    name: str
    model: ModelSettings
    calibration: CalibrationSettings = CalibrationSettings()
    variants: list[Variant] = Field(default_factory=lambda: ["bf16", "fp8"])
    engine: EngineSettings = EngineSettings()
    drafter: DrafterSettings = DrafterSettings()
    bench: BenchSettings = BenchSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    tracking: TrackingSettings = TrackingSettings()

    @property
    def experiment(self) -> str:
        if self.tracking.experiment:
            return self.tracking.experiment
        return f"mathforge-{Path(self.model.source.split(':')[-1]).name}"


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.exists():
            raise UserError(f"preset file {path} does not exist")
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise UserError(
            f"unknown preset {name_or_path!r}; known presets: {', '.join(known)} (or pass a .yaml path)"
        )
    return candidate


# A host-level override that a work pool sets through its job variables (prefect.yaml `gpu-h100`): one
# deployment runs TP=2 on one host and TP=4 on another. It changes recipe keys exactly as editing the preset
# would; it applies to trtllm presets only (torch engines have no tensor parallelism).
TP_SIZE_ENV = "MATHFORGE_TP_SIZE"


def _apply_env_overrides(data: dict) -> dict:
    value = os.environ.get(TP_SIZE_ENV, "").strip()
    engine = data.get("engine")
    if not value or not isinstance(engine, dict) or engine.get("backend") != "trtllm":
        return data
    trtllm = engine.get("trtllm") or {}
    if not isinstance(trtllm, dict):
        raise UserError(f"{TP_SIZE_ENV}: the preset's engine.trtllm is not a mapping")
    engine["trtllm"] = {**trtllm, "tp_size": value}
    return data


def load_preset(name_or_path: str) -> Preset:
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"preset {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {path} must be a YAML mapping")
    data = _apply_env_overrides(data)
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"preset {path} is invalid: {problems}") from None
