#!/usr/bin/env python3
"""Fake `examples/quantization/quantize.py` (flags: reference trtllm_redrafter.md §1a)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fakelib import check_hf_dir, fail, rank_tensors, record, write_safetensors  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model_dir")
p.add_argument("--nemo_ckpt_path")
p.add_argument("--decoder_type", choices=["gptnext", "llama"])
p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
p.add_argument("--device_map", choices=["auto", "sequential", "cpu", "gpu"], default="auto")
p.add_argument("--calib_dataset", default="cnn_dailymail")
p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto")
p.add_argument(
    "--qformat",
    choices=["nvfp4", "fp8", "int8_sq", "int4_awq", "w4a8_awq", "int8_wo", "int4_wo", "full_prec"],
    default="full_prec",
)
p.add_argument("--kv_cache_dtype", choices=["int8", "fp8", "None"], default=None)
p.add_argument("--batch_size", type=int, default=1)
p.add_argument("--calib_size", type=int, default=512)
p.add_argument("--calib_max_seq_length", type=int, default=512)
p.add_argument("--tokenizer_max_seq_length", type=int, default=2048)
p.add_argument("--seed", type=int, default=1234)
p.add_argument("--tp_size", type=int, default=1)
p.add_argument("--pp_size", type=int, default=1)
p.add_argument("--cp_size", type=int, default=1)
p.add_argument("--output_dir", default="exported_model")
p.add_argument("--awq_block_size", type=int, default=128)
p.add_argument("--quantize_lm_head", action="store_true")
args = p.parse_args()
record("quantize.py", sys.argv[1:])

hf = check_hf_dir(Path(args.model_dir))
calib = Path(args.calib_dataset)
# get_calib_dataloader: a local directory is load_dataset(dir, split="train")["text"] (§1a)
if not calib.is_dir():
    fail(f"--calib_dataset {calib}: not a local directory (HF ids other than cnn_dailymail/pileval raise)")
files = sorted(calib.iterdir())
if not files or any(f.suffix != ".parquet" for f in files):
    fail(f"--calib_dataset {calib} must hold parquet data only (a lone file = the train split): {files}")
import pyarrow.parquet as pq  # noqa: E402

rows = 0
for f in files:
    table = pq.read_table(f)
    if "text" not in table.column_names:
        fail(f"{f} has no `text` column")
    rows += table.num_rows
if rows == 0:
    fail("calibration data is empty")

out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
config = {
    "architecture": hf["architectures"][0],
    "dtype": "bfloat16",
    "hidden_size": hf["hidden_size"],
    "vocab_size": hf["vocab_size"],
    "mapping": {"world_size": args.tp_size * args.pp_size, "tp_size": args.tp_size, "pp_size": args.pp_size},
    "quantization": {
        "quant_algo": "FP8" if args.qformat == "fp8" else None,
        "kv_cache_quant_algo": "FP8" if args.kv_cache_dtype == "fp8" else None,
        "exclude_modules": ["lm_head"],
    },
    "fake": {"calib_rows": rows, "calib_size": args.calib_size},
}
(out / "config.json").write_text(json.dumps(config, indent=1))
for r in range(args.tp_size):
    write_safetensors(out / f"rank{r}.safetensors", rank_tensors("F8_E4M3", 8))
print(f"quantized {args.model_dir} to fp8 with {min(rows, args.calib_size)} calibration samples")
