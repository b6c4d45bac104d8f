#!/usr/bin/env python3
"""Fake `examples/redrafter/convert_checkpoint.py`, the new generation (reference trtllm_redrafter.md §3)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fakelib import check_trt_checkpoint, fail, rank_tensors, read_json, record, write_safetensors  # noqa: E402

REDRAFTER_MAP = {
    "QWenForCausalLM": "ReDrafterForQWenLM",
    "Qwen2ForCausalLM": "ReDrafterForQWenLM",
    "LlamaForCausalLM": "ReDrafterForLLaMALM",
}
p = argparse.ArgumentParser()
p.add_argument("--base_model_checkpoint_dir", required=True)
p.add_argument("--drafter_model_dir", required=True)
p.add_argument("--output_dir", default="tllm_checkpoint")
p.add_argument("--tp_size", type=int, default=1)
p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float16")
p.add_argument("--storage-type", "-t", choices=["fp32", "fp16"], default="fp32")
p.add_argument("--load_model_on_cpu", action="store_true")
p.add_argument("--use_parallel_embedding", action="store_true")
p.add_argument("--embedding_sharding_dim", type=int, choices=[0, 1], default=0)
p.add_argument("--workers", type=int, default=1)
p.add_argument("--dense_context_fmha", action="store_true")
p.add_argument("--redrafter_draft_len_per_beam", type=int, default=5)
p.add_argument("--redrafter_num_beams", type=int, default=5)
p.add_argument("--redrafter_no_greedy_search", dest="redrafter_greedy_search", action="store_false")
args = p.parse_args()
record("redrafter/convert_checkpoint.py", sys.argv[1:])

base = check_trt_checkpoint(Path(args.base_model_checkpoint_dir), args.tp_size, "base checkpoint")
if base["architecture"] not in REDRAFTER_MAP:
    fail(f"unsupported base architecture {base['architecture']}")
drafter_dir = Path(args.drafter_model_dir)
drafter = read_json(drafter_dir / "config.json", "drafter")
for key in ("hidden_size", "exit_dim", "num_draft_layers", "rnn"):
    if key not in drafter:
        fail(f"drafter config.json lacks {key}")
if not (drafter_dir / "model.safetensors").is_file():
    fail("drafter has no model.safetensors")
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
config = dict(base)
config.update(
    base_model_architecture=base["architecture"],
    architecture=REDRAFTER_MAP[base["architecture"]],
    redrafter_num_layers=drafter["num_draft_layers"],
    redrafter_hidden_size=drafter["hidden_size"],
    redrafter_exit_dim=drafter["exit_dim"],
    redrafter_is_rnn=drafter["rnn"],
    redrafter_num_beams=args.redrafter_num_beams,
    redrafter_draft_len_per_beam=args.redrafter_draft_len_per_beam,
    redrafter_greedy_search=args.redrafter_greedy_search,
    dtype=args.dtype,
)
if config.get("quantization", {}).get("exclude_modules") is not None:
    config["quantization"]["exclude_modules"] += ["drafter", "drafter.layers", "drafter.lm_head"]
(out / "config.json").write_text(json.dumps(config, indent=1))
for r in range(args.tp_size):
    tensors = rank_tensors("F8_E4M3", 8)
    tensors["drafter.lm_head.weight"] = ("BF16", [16, 16])
    write_safetensors(out / f"rank{r}.safetensors", tensors)
print("converted ReDrafter checkpoint")
