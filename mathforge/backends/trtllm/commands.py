"""Command lines for TensorRT-LLM: pure functions from recipes and paths to argv lists.

Every flag is from reference/trtllm_redrafter.md (section given where the choice is not obvious) and is
pinned by tests/test_trtllm_commands.py. Paths are plain strings, so the dry-run plan can pass
placeholders such as `<checkpoint>` and get the very command a run would execute.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from mathforge.backends.trtllm import versions
from mathforge.backends.trtllm.recipes import CheckpointRecipe, EngineRecipe
from mathforge.errors import UserError

QUANTIZE_SCRIPT = "quantization/quantize.py"
REDRAFTER_SCRIPT = "redrafter/convert_checkpoint.py"
# per-model BF16 converters (reference §1a: BF16 engines need the model's convert_checkpoint.py; flag set as
# NeMo-Skills' legacy bf16 path, a copy of it: nemo_skills.md §5.1)
CONVERT_SCRIPTS = {
    "qwen": "models/core/qwen/convert_checkpoint.py",
    "llama": "models/core/llama/convert_checkpoint.py",
}
ARCHITECTURE_TYPES = {"Qwen2ForCausalLM": "qwen", "QWenForCausalLM": "qwen", "LlamaForCausalLM": "llama"}


@dataclass(frozen=True)
class Command:
    """One external command: its argv and a short title for logs and the plan."""

    title: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return shlex.join(self.argv)

    def to_list(self) -> list[str]:
        return list(self.argv)


def _script(examples_dir: str, rel: str) -> str:
    return str(PurePosixPath(examples_dir) / rel)


def model_type_of(architectures: list[str] | None) -> str:
    """`qwen` / `llama` from a HF config's `architectures`, for the BF16 converter's directory."""
    for arch in architectures or []:
        if arch in ARCHITECTURE_TYPES:
            return ARCHITECTURE_TYPES[arch]
    raise UserError(
        f"no TensorRT-LLM converter for architectures {architectures}: the trtllm backend supports "
        f"{', '.join(sorted(ARCHITECTURE_TYPES))} (set engine.trtllm.model_type to override)"
    )


def convert_script(model_type: str | None) -> str:
    """The BF16 converter of a model type; None (the plan, before config.json is known) a placeholder."""
    if model_type is None:
        return "models/core/<model_type>/convert_checkpoint.py"
    if model_type not in CONVERT_SCRIPTS:
        raise UserError(f"unknown model_type {model_type!r}; choose from {', '.join(CONVERT_SCRIPTS)}")
    return CONVERT_SCRIPTS[model_type]


def convert_bf16(r: CheckpointRecipe, model_dir: str, output_dir: str, model_type: str | None) -> Command:
    """HF checkpoint -> BF16 TensorRT-LLM checkpoint, split for TP (`rank{r}.safetensors`)."""
    argv = (
        r.tools.python,
        _script(r.tools.examples_dir, convert_script(model_type)),
        "--model_dir", model_dir,
        "--output_dir", output_dir,
        "--dtype", "bfloat16",
        "--tp_size", str(r.tp_size),
        "--pp_size", "1",
    )  # fmt: skip
    return Command("convert BF16 checkpoint", argv)


def quantize_fp8(r: CheckpointRecipe, model_dir: str, calib_dir: str, output_dir: str) -> Command:
    """HF checkpoint + calibration directory -> FP8 TensorRT-LLM checkpoint (reference §1a).

    `calib_dir` is the calibration artifact's `data/` directory: quantize.py loads a local directory with
    `load_dataset(dir, split="train")["text"]`, and a lone parquet there is the train split (§1a, §8.2).
    `--dtype auto --batch_size 4`, no `--kv_cache_dtype` (KV stays BF16) are the recipe's (§1a)."""
    if r.precision != "fp8" or r.calib_size is None:
        raise ValueError("quantize_fp8 needs an fp8 checkpoint recipe")
    argv = [
        r.tools.python,
        _script(r.tools.examples_dir, QUANTIZE_SCRIPT),
        "--model_dir", model_dir,
        "--dtype", "auto",
        "--qformat", "fp8",
        "--output_dir", output_dir,
        "--calib_dataset", calib_dir,
        "--calib_size", str(r.calib_size),
        "--batch_size", str(r.calib_batch_size),
        "--calib_max_seq_length", str(r.calib_max_seq_length),
        "--tp_size", str(r.tp_size),
        "--pp_size", "1",
    ]  # fmt: skip
    if r.kv_cache_dtype:
        argv += ["--kv_cache_dtype", r.kv_cache_dtype]
    return Command("quantize FP8 checkpoint", tuple(argv))


def checkpoint_command(
    r: CheckpointRecipe, model_dir: str, calib_dir: str | None, output_dir: str, model_type: str | None
) -> Command:
    versions.check_engine_flow(r.version, "TensorRT-LLM checkpoints")
    if r.precision == "fp8":
        if calib_dir is None:
            raise ValueError("an FP8 checkpoint needs the calibration directory")
        return quantize_fp8(r, model_dir, calib_dir, output_dir)
    return convert_bf16(r, model_dir, output_dir, model_type or r.model_type)


def redrafter_convert(
    r: EngineRecipe, base_checkpoint_dir: str, drafter_dir: str, output_dir: str
) -> Command:
    """FP8 base checkpoint + drafter -> ReDrafter checkpoint (reference §3, the new converter).

    `--base_model_checkpoint_dir` is the quantized TensorRT-LLM checkpoint (the only form that supports
    Qwen2); `--tp_size` must equal its TP (§8.3); `--dtype bfloat16` because the default float16 would not
    match the base (§8.5)."""
    if r.redrafter is None:
        raise ValueError("redrafter_convert needs a ReDrafter engine recipe")
    versions.check_redrafter(r.version)
    argv = [
        r.tools.python,
        _script(r.tools.examples_dir, REDRAFTER_SCRIPT),
        "--base_model_checkpoint_dir", base_checkpoint_dir,
        "--drafter_model_dir", drafter_dir,
        "--output_dir", output_dir,
        "--dtype", "bfloat16",
        "--tp_size", str(r.tp_size),
        "--redrafter_num_beams", str(r.redrafter.num_beams),
        "--redrafter_draft_len_per_beam", str(r.redrafter.draft_len_per_beam),
    ]  # fmt: skip
    if not r.redrafter.greedy_search:
        argv.append("--redrafter_no_greedy_search")  # store_false flag (§3)
    return Command("convert ReDrafter checkpoint", tuple(argv))


def trtllm_build(r: EngineRecipe, checkpoint_dir: str, output_dir: str) -> Command:
    """trtllm-build for one variant (reference §2).

    Plugins as in the recipe's engines: `--gemm_plugin auto` for BF16 and FP8 (ns convert, §1a), `fp8` for
    the ReDrafter engine (§2); `--use_paged_context_fmha enable` everywhere. ReDrafter adds
    `--speculative_decoding_mode explicit_draft_tokens --max_beam_width 1 --kv_cache_type paged`; its
    max_draft_len is computed inside the model (§2, §3), so it is not passed."""
    versions.check_engine_flow(r.version)
    gemm = "fp8" if r.redrafter is not None else "auto"
    argv = [
        "trtllm-build",
        "--checkpoint_dir", checkpoint_dir,
        "--output_dir", output_dir,
        "--gemm_plugin", gemm,
        "--use_paged_context_fmha", "enable",
        "--max_batch_size", str(r.max_batch_size),
        "--max_input_len", str(r.max_input_len),
        "--max_seq_len", str(r.max_seq_len),
        "--max_num_tokens", str(r.max_num_tokens),
    ]  # fmt: skip
    if r.redrafter is not None:
        versions.check_redrafter(r.version)
        argv += [
            "--speculative_decoding_mode", "explicit_draft_tokens",
            "--max_beam_width", "1",
            "--kv_cache_type", "paged",
        ]  # fmt: skip
    return Command(f"build {r.variant} engine", tuple(argv))


def engine_commands(
    r: EngineRecipe, checkpoint_dir: str, drafter_dir: str | None, output_dir: str, scratch_dir: str
) -> list[Command]:
    """Everything that turns a TensorRT-LLM checkpoint into the variant's engine, in order."""
    if r.redrafter is None:
        return [trtllm_build(r, checkpoint_dir, output_dir)]
    if drafter_dir is None:
        raise ValueError("the fp8+redrafter engine needs the drafter directory")
    return [
        redrafter_convert(r, checkpoint_dir, drafter_dir, scratch_dir),
        trtllm_build(r, scratch_dir, output_dir),
    ]


def serve(
    model: str,
    *,
    runtime: str,
    version: str,
    tp_size: int,
    max_batch_size: int,
    kv_cache_free_gpu_memory_fraction: float,
    host: str,
    port: int | str,
    tokenizer: str | None = None,
    max_num_tokens: int | None = None,
    max_seq_len: int | None = None,
    extra_llm_api_options: str | None = None,
) -> Command:
    """trtllm-serve (reference §4).

    Engines: `trtllm-serve serve <engine> --tokenizer <dir> --backend trt --tp_size N
    --kv_cache_free_gpu_memory_fraction F --max_batch_size B --host H --port P`, the recipe's command; a
    ReDrafter engine needs no speculative config (decoding mode is detected from the engine, §3, §8.8), and
    runtime shapes are left to the engine's build values. PyTorch backend: the HF or ModelOpt FP8 checkpoint
    directory, the runtime shapes, and the YAML of `extra_llm_api_options`."""
    backend = versions.serve_backend(runtime, version)
    argv = ["trtllm-serve", "serve", model]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    argv += [
        "--backend", backend,
        "--tp_size", str(tp_size),
        "--kv_cache_free_gpu_memory_fraction", f"{kv_cache_free_gpu_memory_fraction:g}",
        "--max_batch_size", str(max_batch_size),
    ]  # fmt: skip
    if backend == "pytorch":
        if max_num_tokens is not None:
            argv += ["--max_num_tokens", str(max_num_tokens)]
        if max_seq_len is not None:
            argv += ["--max_seq_len", str(max_seq_len)]
    elif extra_llm_api_options:
        raise UserError("extra_llm_api_options are generated for the PyTorch backend only")
    argv += ["--host", host, "--port", str(port)]
    if extra_llm_api_options:
        argv += ["--extra_llm_api_options", extra_llm_api_options]
    return Command("serve", tuple(argv))
