"""Presets: the YAML files in configs/ (or any path) validated into typed settings.

A preset is the one place a user edits to point mathforge at another model, data set or machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mathforge.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO_ROOT / "configs"
EMBEDDED_MODELS = {"tiny": Path(__file__).resolve().parent / "data" / "tiny_model"}

Variant = Literal["bf16", "fp8"]
VARIANTS: tuple[str, ...] = ("bf16", "fp8")


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


class EngineSettings(_Strict):
    backend: Literal["torch"] = "torch"
    device: str = "cpu"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_slots: int = Field(8, gt=0)
    max_model_len: int = Field(2048, gt=0)


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


def load_preset(name_or_path: str) -> Preset:
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"preset {path} is not valid YAML: {exc}") from None
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"preset {path} is invalid: {problems}") from None
