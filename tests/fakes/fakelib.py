"""Shared helpers of the fake TensorRT-LLM tools: argv recording, safetensors writing, input checks."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}


def record(tool: str, argv: list[str]) -> None:
    """Append {"tool", "argv", "time"} to $MATHFORGE_FAKE_TRTLLM_LOG (the test reads it back)."""
    path = os.environ.get("MATHFORGE_FAKE_TRTLLM_LOG")
    if not path:
        fail(f"{tool}: MATHFORGE_FAKE_TRTLLM_LOG is not set")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"tool": tool, "argv": argv, "time": time.time()}) + "\n")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file of zero-filled tensors {name: (dtype, shape)}."""
    header: dict = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BYTES[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        fail(f"{what}: cannot read {path}: {exc}")
        raise


def rank_tensors(dtype: str, hidden: int) -> dict[str, tuple[str, list[int]]]:
    return {
        "transformer.layers.0.attention.qkv.weight": (dtype, [hidden, hidden]),
        "transformer.vocab_embedding.weight": ("BF16", [16, hidden]),
    }


def check_trt_checkpoint(directory: Path, tp_size: int, what: str) -> dict:
    config = read_json(directory / "config.json", what)
    for r in range(tp_size):
        if not (directory / f"rank{r}.safetensors").is_file():
            fail(f"{what}: {directory} has no rank{r}.safetensors (tp_size {tp_size})")
    mapping = config.get("mapping", {})
    if mapping.get("tp_size") != tp_size:
        fail(f"{what}: checkpoint tp_size {mapping.get('tp_size')} != --tp_size {tp_size}")
    return config


def check_hf_dir(directory: Path) -> dict:
    config = read_json(directory / "config.json", "HF checkpoint")
    if not config.get("architectures"):
        fail(f"{directory}/config.json has no architectures: not a Hugging Face checkpoint")
    if not any(directory.glob("*.safetensors")):
        fail(f"{directory} has no safetensors weights")
    return config
