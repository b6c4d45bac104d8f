"""Build TensorRT-LLM artifacts on a host that has it: run the generated commands, check what they wrote.

- `build_checkpoint`: HF checkpoint -> TensorRT-LLM checkpoint (BF16 conversion or FP8 quantization).
- `build_engine`: TensorRT-LLM checkpoint (+ drafter) -> engine directory with the tokenizer and
  `engine.json` (what serving needs, and the exact commands that produced it).
- `describe_pytorch_engine`: the PyTorch-backend route, where nothing is compiled: `engine.json` only.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mathforge.backends.trtllm import commands as cmds
from mathforge.backends.trtllm import versions
from mathforge.backends.trtllm.host import require_trtllm
from mathforge.backends.trtllm.recipes import REDRAFTER_VARIANT, CheckpointRecipe, EngineRecipe
from mathforge.backends.trtllm.runner import run_commands
from mathforge.config import TrtllmSettings
from mathforge.errors import UserError

Log = Callable[[str], object]
BUILD_RECORD = "mathforge-build.json"
SCRATCH = ".redrafter-checkpoint"  # inside the build directory, removed before the artifact is hashed
# the recipe copies `<hf>/tokenizer*` into the engine directory (reference §1a); these are the HF files that
# make up a tokenizer (config.json is not one: an engine directory has its own)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DRAFTER_CONFIG_KEYS = ("hidden_size", "exit_dim", "num_draft_layers", "rnn")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: cannot read {path} ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} is not a JSON object")
    return data


def hf_model_type(model_dir: Path) -> str:
    return cmds.model_type_of(read_json(model_dir / "config.json", "checkpoint").get("architectures"))


def check_checkpoint(directory: Path, tp_size: int, what: str = "TensorRT-LLM checkpoint") -> dict:
    """config.json plus one rank{r}.safetensors per TP rank, and a mapping that agrees (reference §8.3)."""
    config = read_json(directory / "config.json", what)
    missing = [
        f"rank{r}.safetensors" for r in range(tp_size) if not (directory / f"rank{r}.safetensors").is_file()
    ]
    if missing:
        raise UserError(f"{what} {directory} lacks {', '.join(missing)} (tensor parallel size {tp_size})")
    mapping_tp = (config.get("mapping") or {}).get("tp_size")
    if mapping_tp is not None and int(mapping_tp) != tp_size:
        raise UserError(
            f"{what} {directory} was made for tensor parallel size {mapping_tp}, not {tp_size}: the converter, "
            "the engine and trtllm-serve must all use the checkpoint's TP (reference §8.3)"
        )
    return config


def check_engine(directory: Path, tp_size: int) -> dict:
    config = read_json(directory / "config.json", "engine")
    missing = [f"rank{r}.engine" for r in range(tp_size) if not (directory / f"rank{r}.engine").is_file()]
    if missing:
        raise UserError(f"trtllm-build wrote no {', '.join(missing)} into {directory}")
    return config


def check_drafter(directory: Path, num_draft_layers: int | None = None, rnn: bool | None = None) -> dict:
    """The layout TensorRT-LLM's ReDrafter converter reads (reference §3, §8.4): config.json with
    hidden_size, exit_dim, num_draft_layers, rnn, and ONE model.safetensors (or model.pt), never shards."""
    directory = Path(directory)
    config = read_json(directory / "config.json", "drafter")
    absent = [k for k in DRAFTER_CONFIG_KEYS if k not in config]
    if absent:
        raise UserError(
            f"drafter {directory}: config.json lacks {', '.join(absent)} (Apple ReDrafter layout)"
        )
    shards = sorted(p.name for p in directory.glob("model-*.safetensors")) + sorted(
        p.name for p in directory.glob("*.index.json")
    )
    if shards:
        raise UserError(
            f"drafter {directory} is sharded ({', '.join(shards[:3])}): TensorRT-LLM's converter reads one "
            "model.safetensors; save the drafter in bf16 (about 3.6 GB for a 14B base) so it is not sharded"
        )
    if not (directory / "model.safetensors").is_file() and not (directory / "model.pt").is_file():
        raise UserError(f"drafter {directory} has no model.safetensors")
    if num_draft_layers is not None and int(config["num_draft_layers"]) != num_draft_layers:
        raise UserError(
            f"drafter {directory} has {config['num_draft_layers']} draft layers, the preset says "
            f"{num_draft_layers} (drafter.num_draft_layers)"
        )
    if rnn is not None and bool(config["rnn"]) != rnn:
        raise UserError(f"drafter {directory} has rnn={config['rnn']}, the preset says {rnn} (drafter.rnn)")
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _weights(directory: Path) -> dict[str, int]:
    from mathforge.engine.build import weight_bytes

    return weight_bytes(directory)


def build_checkpoint(
    recipe: CheckpointRecipe, model_dir: Path, calib_dir: Path | None, out: Path, log: Log
) -> dict:
    model_type = None
    script = cmds.QUANTIZE_SCRIPT
    if recipe.precision == "bf16":  # the per-model converter: which model is it?
        model_type = recipe.model_type or hf_model_type(model_dir)
        script = cmds.convert_script(model_type)
    installed = require_trtllm(
        version=recipe.version,
        image=recipe.tools.image,
        python=recipe.tools.python,
        scripts=[script],
        examples_dir=recipe.tools.examples_dir,
        tp_size=recipe.tp_size,
        what=f"the {recipe.precision} TensorRT-LLM checkpoint",
    )
    command = cmds.checkpoint_command(
        recipe, str(model_dir), None if calib_dir is None else str(calib_dir), str(out), model_type
    )
    records = run_commands([command], log=log)
    config = check_checkpoint(out, recipe.tp_size)
    record = {"recipe": recipe.model_dump(), "trtllm_installed": installed, "commands": records}
    _write_json(out / BUILD_RECORD, record)
    return {"architecture": config.get("architecture"), "trtllm_installed": installed}


def _hf_summary(model_dir: Path) -> dict:
    config = read_json(model_dir / "config.json", "checkpoint")
    return {
        "model_type": config.get("model_type"),
        "num_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
    }


def build_engine(
    recipe: EngineRecipe,
    *,
    hf_dir: Path,
    checkpoint_dir: Path,
    drafter_dir: Path | None,
    out: Path,
    refs: dict[str, dict | None],
    log: Log,
) -> dict:
    """Run the variant's commands into `out`, then write engine.json. `refs` names the input artifacts
    (weights = the HF checkpoint: tokenizer and model identity; trtllm_checkpoint; drafter)."""
    redrafter = recipe.redrafter
    installed = require_trtllm(
        version=recipe.version,
        image=recipe.tools.image,
        python=recipe.tools.python,
        tools=["trtllm-build"],
        scripts=[cmds.REDRAFTER_SCRIPT] if redrafter else [],
        examples_dir=recipe.tools.examples_dir,
        tp_size=recipe.tp_size,
        what=f"the {recipe.variant} engine",
    )
    base = check_checkpoint(checkpoint_dir, recipe.tp_size)
    if redrafter is not None:
        if drafter_dir is None:
            raise UserError("the fp8+redrafter engine needs a drafter")
        check_drafter(drafter_dir, redrafter.num_draft_layers, redrafter.rnn)
        if (base.get("quantization") or {}).get("quant_algo") not in (None, "FP8"):
            raise UserError(f"the ReDrafter base checkpoint {checkpoint_dir} is not FP8")
    scratch = out / SCRATCH
    commands = cmds.engine_commands(
        recipe, str(checkpoint_dir), None if drafter_dir is None else str(drafter_dir), str(out), str(scratch)
    )
    records = run_commands(commands, log=log)
    weights = _weights(scratch if redrafter is not None else checkpoint_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    check_engine(out, recipe.tp_size)
    copied = []
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
            copied.append(name)
    if "tokenizer_config.json" not in copied:
        raise UserError(f"checkpoint {hf_dir} has no tokenizer_config.json to put beside the engine")
    engine_bytes = sum(f.stat().st_size for f in out.glob("rank*.engine"))
    spec = {
        "backend": "trtllm",
        "runtime": "trt",
        "variant": recipe.variant,
        "weights": refs["weights"],
        "inputs": {k: v for k, v in refs.items() if k != "weights"},
        "quantization": "fp8" if recipe.precision == "fp8" else None,
        "speculative": None if redrafter is None else {"method": "redrafter", **redrafter.model_dump()},
        "tp_size": recipe.tp_size,
        "trtllm_version": recipe.version,
        "trtllm_installed": installed,
        "weight_bytes": sum(weights.values()),
        "weight_bytes_by_dtype": weights,
        "engine_bytes": engine_bytes,
        "tokenizer_files": copied,
        **_hf_summary(hf_dir),
        # max_slots / max_model_len / device: the names the torch backend's runs use, for side-by-side params
        "build": {
            **recipe.model_dump(),
            "dtype": "bfloat16",  # what is not FP8 (and the whole bf16 variant)
            "device": "cuda",
            "max_slots": recipe.max_batch_size,
            "max_model_len": recipe.max_seq_len,
        },
        "commands": records,
    }
    _write_json(out / "engine.json", spec)
    return spec


def describe_pytorch_engine(
    weights_dir: Path, weights_ref: dict, variant: str, settings: TrtllmSettings, out: Path
) -> dict:
    """The PyTorch-backend route: trtllm-serve loads the HF (bf16) or ModelOpt FP8 checkpoint itself."""
    versions.check_supported(settings.version)
    if variant == REDRAFTER_VARIANT:
        raise UserError(
            "the fp8+redrafter variant needs TensorRT engines (engine.trtllm.runtime: trt): the PyTorch "
            "backend has no ReDrafter decoding_type; there, use engine.trtllm.speculative (Eagle3, "
            "DraftTarget or NGram) with the fp8 variant"
        )
    quantized = (weights_dir / "hf_quant_config.json").is_file()
    if variant == "fp8" and not quantized:
        raise UserError(
            f"variant fp8 needs the ModelOpt FP8 checkpoint, but {weights_dir} has no hf_quant_config.json"
        )
    weights = _weights(weights_dir)
    spec = {
        "backend": "trtllm",
        "runtime": "pytorch",
        "variant": variant,
        "weights": weights_ref,
        "inputs": {},
        "quantization": "fp8" if quantized else None,
        "speculative": None if settings.speculative is None else settings.speculative.model_dump(),
        "tp_size": settings.tp_size,
        "trtllm_version": settings.version,
        "weight_bytes": sum(weights.values()),
        "weight_bytes_by_dtype": weights,
        **_hf_summary(weights_dir),
        "build": {
            **settings.model_dump(),
            "dtype": "bfloat16",
            "device": "cuda",
            "max_slots": settings.max_batch_size,
            "max_model_len": settings.max_seq_len,
        },
        "commands": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "engine.json", spec)
    return spec
