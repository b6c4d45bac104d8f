"""What each TensorRT-LLM artifact depends on: the parameters of its recipe key, and nothing else.

A TensorRT-LLM checkpoint does not depend on engine shapes, and an engine does not depend on serve flags,
so each gets its own small model built from the preset. Where the tools live on a host (`examples_dir`,
`python`) is carried along but excluded from the key (pydantic `exclude`), the same way a source's locator
is: the same recipe on another host is the same artifact.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mathforge.backends.trtllm import versions
from mathforge.config import Preset, TrtllmSettings
from mathforge.errors import UserError

Precision = Literal["bf16", "fp8"]
REDRAFTER_VARIANT = "fp8+redrafter"


class _Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tools(_Recipe):
    """Where TensorRT-LLM's example scripts and interpreter are on this host (never part of a key)."""

    examples_dir: str = Field(exclude=True)
    python: str = Field(exclude=True)
    image: str = Field(exclude=True)  # the container that has them, named when a host does not


class CheckpointRecipe(_Recipe):
    """A TensorRT-LLM checkpoint (config.json + rank{r}.safetensors): BF16 conversion or FP8 quantization."""

    precision: Precision
    version: str
    tp_size: int
    model_type: Literal["qwen", "llama"] | None = None  # bf16 conversion script; None: from config.json
    calib_size: int | None = None  # fp8 only
    calib_batch_size: int | None = None
    calib_max_seq_length: int | None = None
    kv_cache_dtype: Literal["fp8"] | None = None
    tools: Tools


class RedrafterRecipe(_Recipe):
    num_beams: int
    draft_len_per_beam: int
    greedy_search: bool
    num_draft_layers: int
    rnn: bool


class EngineRecipe(_Recipe):
    """A TensorRT engine directory built by trtllm-build (and, for ReDrafter, the converter before it)."""

    variant: str
    version: str
    tp_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    redrafter: RedrafterRecipe | None = None
    tools: Tools

    @property
    def precision(self) -> Precision:
        return "bf16" if self.variant == "bf16" else "fp8"

    @property
    def tokens_per_step(self) -> int:
        """Tokens one request feeds per generation step: 1 + num_beams * draft_len (reference §3)."""
        if self.redrafter is None:
            return 1
        return 1 + self.redrafter.num_beams * self.redrafter.draft_len_per_beam


def trtllm_settings(preset: Preset) -> TrtllmSettings:
    if preset.engine.backend != "trtllm" or preset.engine.trtllm is None:
        raise UserError(f"preset {preset.name} does not use the trtllm backend (engine.backend: trtllm)")
    return preset.engine.trtllm


def tools(settings: TrtllmSettings) -> Tools:
    return Tools(examples_dir=settings.examples_dir, python=settings.python, image=settings.container_image)


def checkpoint_recipe(preset: Preset, precision: Precision) -> CheckpointRecipe:
    t = trtllm_settings(preset)
    versions.check_engine_flow(t.version, "TensorRT-LLM checkpoints")
    common = {"precision": precision, "version": t.version, "tp_size": t.tp_size, "tools": tools(t)}
    if precision == "bf16":
        return CheckpointRecipe(model_type=t.model_type, **common)
    c = preset.calibration
    return CheckpointRecipe(
        calib_size=c.num_samples,
        calib_batch_size=t.calib_batch_size,
        calib_max_seq_length=c.max_seq_len,
        kv_cache_dtype=t.kv_cache_dtype,
        **common,
    )


def engine_recipe(preset: Preset, variant: str) -> EngineRecipe:
    t = trtllm_settings(preset)
    versions.check_engine_flow(t.version)
    redrafter = None
    if variant == REDRAFTER_VARIANT:
        versions.check_redrafter(t.version)
        d = preset.drafter
        redrafter = RedrafterRecipe(
            num_beams=d.num_beams,
            draft_len_per_beam=d.draft_len,
            greedy_search=d.greedy_search,
            num_draft_layers=d.num_draft_layers,
            rnn=d.rnn,
        )
    elif variant not in ("bf16", "fp8"):
        raise UserError(f"unknown variant {variant!r}")
    recipe = EngineRecipe(
        variant=variant,
        version=t.version,
        tp_size=t.tp_size,
        max_batch_size=t.max_batch_size,
        max_input_len=t.max_input_len,
        max_seq_len=t.max_seq_len,
        max_num_tokens=t.max_num_tokens,
        redrafter=redrafter,
        tools=tools(t),
    )
    # reference §8 pitfall 7: every request's generation tokens must fit one step's token budget
    needed = recipe.max_batch_size * recipe.tokens_per_step
    if recipe.max_num_tokens < needed:
        raise UserError(
            f"engine.trtllm.max_num_tokens {recipe.max_num_tokens} cannot hold a full batch of {variant} "
            f"generation steps: max_batch_size {recipe.max_batch_size} x {recipe.tokens_per_step} tokens per "
            f"step = {needed}; raise max_num_tokens or lower max_batch_size"
        )
    return recipe
