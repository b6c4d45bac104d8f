#!/usr/bin/env python3
"""Fake `examples/models/core/qwen/convert_checkpoint.py` (flags: nemo_skills.md §5.1 legacy bf16 path)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from fakelib import check_hf_dir, fail, rank_tensors, record, write_safetensors  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model_dir", required=True)
p.add_argument("--output_dir", default="tllm_checkpoint")
p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float16")
p.add_argument("--tp_size", type=int, default=1)
p.add_argument("--pp_size", type=int, default=1)
p.add_argument("--workers", type=int, default=1)
args = p.parse_args()
record("qwen/convert_checkpoint.py", sys.argv[1:])

hf = check_hf_dir(Path(args.model_dir))
if not hf["architectures"][0].startswith("Qwen"):
    fail(f"not a Qwen checkpoint: {hf['architectures']}")
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
config = {
    "architecture": hf["architectures"][0],
    "dtype": args.dtype,
    "hidden_size": hf["hidden_size"],
    "vocab_size": hf["vocab_size"],
    "mapping": {"world_size": args.tp_size * args.pp_size, "tp_size": args.tp_size, "pp_size": args.pp_size},
    "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
}
(out / "config.json").write_text(json.dumps(config, indent=1))
for r in range(args.tp_size):
    write_safetensors(out / f"rank{r}.safetensors", rank_tensors("BF16", 8))
print(f"converted {args.model_dir} to {args.dtype}")
