"""Speculative decoding on a GPU: the tiny model's variants served and benchmarked, in one run.

    python benchmarks/speculative_gpu.py --bf16 mathforge/data/tiny_model --fp8 FP8_DIR --drafter DRAFTER_DIR \
        --out results.json

1. Greedy equality: the engine with and without the drafter on the benchmark prompts, token for token, with
   the default verify layout and with single-token verify rows (`verify_rows=True`).
2. Drafting from CUDA graphs vs eager drafting: the in-process engine generates the same requests both ways
   (and without a drafter), in interleaved rounds, at each `--engine-batch`; output tok/s and the ratio.
3. `mathforge serve` per variant (bf16, fp8, bf16+redrafter, fp8+redrafter; CUDA graphs on) and the
   benchmark client at each concurrency, requests stopping at EOS (the drafter was trained on real
   solutions, not on what a model writes after its answer).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mathforge.bench.cli import positive_ints  # noqa: E402
from mathforge.bench.run import run_benchmark_sync  # noqa: E402
from mathforge.serving import ServerProcess, free_port, mathforge_argv  # noqa: E402


def prompts_for(model_dir: Path, n: int) -> list[str]:
    from mathforge.checkpoint import load_tokenizer
    from mathforge.data.problems import load_problems
    from mathforge.data.prompts import render_chat

    tok = load_tokenizer(model_dir)
    return [render_chat(tok, p.problem, tools=True) for p in load_problems("tiny", split="test")][:n]


def greedy_equality(weights: Path, drafter: Path, prompts: list[str], max_tokens: int, device: str) -> dict:
    from mathforge.engine.api import SamplingParams
    from mathforge.engine.engine import Engine

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    plain = Engine.from_pretrained(weights, device=device, max_slots=8, max_model_len=1024)
    ids = [plain.tokenizer.encode(p) for p in prompts]
    ref = [o.token_ids for o in plain.generate(ids, params)]
    del plain
    out = {}
    for rows in (None, True):
        spec = Engine.from_pretrained(
            weights,
            device=device,
            max_slots=8,
            max_model_len=1024,
            drafter=drafter,
            draft_len=3,
            verify_rows=rows,
        )
        got = spec.generate(ids, params)
        same = sum(g.token_ids == r for g, r in zip(got, ref, strict=True))
        first_diff = [
            next(
                (i for i, (a, b) in enumerate(zip(g.token_ids, r, strict=False)) if a != b),
                min(len(g.token_ids), len(r)),
            )
            for g, r in zip(got, ref, strict=True)
            if g.token_ids != r
        ]
        lens = [x for g in got for x in g.accept_lens]
        out["rows" if rows else "block"] = {
            "identical": same,
            "of": len(ref),
            "first_divergence_at": first_diff,
            "tokens_per_verify": sum(lens) / max(len(lens), 1),
        }
        del spec
    return out


def drafting_graphs_ab(
    weights: Path, drafter: Path, prompts: list[str], max_tokens: int, device: str, batches: list[int]
) -> dict:
    """Output tok/s of the engine generating `prompts` in batches of B, greedy: without a drafter, with the
    drafter's steps eager, with them replayed from graphs (the verify forward is graph-replayed in both).
    Two interleaved rounds each; the better round counts."""
    import time

    from mathforge.engine.api import SamplingParams
    from mathforge.engine.engine import Engine

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    kw = {"device": device, "max_slots": max(batches), "max_model_len": 1024}
    engines = {"plain": Engine.from_pretrained(weights, **kw)}
    engines["spec"] = Engine.from_pretrained(weights, drafter=drafter, draft_len=3, **kw)
    graphs = engines["spec"].draft_graphs
    ids = [engines["plain"].tokenizer.encode(p) for p in prompts]

    def run(mode: str, B: int) -> float:
        eng = engines["plain" if mode == "plain" else "spec"]
        eng.draft_graphs = graphs if mode == "draft_graphs" else None
        eng.generate(ids[:B], params)  # warm-up of this batch shape
        if device == "cuda":
            torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        for i in range(0, len(ids), B):
            n += sum(len(o.token_ids) for o in eng.generate(ids[i : i + B], params))
        if device == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    out = {}
    for B in batches:
        best: dict[str, float] = {}
        for _ in range(2):
            for mode in ("plain", "draft_eager", "draft_graphs"):
                best[mode] = max(best.get(mode, 0.0), run(mode, B))
        best["graphs_vs_eager"] = best["draft_graphs"] / best["draft_eager"]
        best["graphs_vs_plain"] = best["draft_graphs"] / best["plain"]
        out[f"batch_{B}"] = best
        print(weights.name, f"B={B}", {k: round(v, 3) for k, v in best.items()}, flush=True)
    engines["spec"].draft_graphs = graphs
    return out


def serve_and_bench(name: str, weights: Path, extra: list[str], prompts: list[str], args, logs: Path) -> dict:
    port = free_port()
    argv = mathforge_argv(
        "serve", str(weights), "--device", args.device, "--port", str(port), "--served-model-name", name,
        "--max-slots", "32", "--max-model-len", "2048", *extra,
    )  # fmt: skip
    with ServerProcess(
        argv, health_url=f"http://127.0.0.1:{port}/health", log_file=logs / f"{name}.log", name=name
    ):
        res = run_benchmark_sync(
            f"http://127.0.0.1:{port}/v1", name, prompts, concurrency_levels=args.concurrency,
            num_prompts=args.num_prompts, max_tokens=args.max_tokens, warmup=2, ignore_eos=False,
        )  # fmt: skip
    return {
        "command": " ".join(argv[2:]),
        "levels": [{k: v for k, v in lv.items() if k != "requests"} for lv in res["levels"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", type=Path, required=True)
    ap.add_argument("--fp8", type=Path, required=True)
    ap.add_argument("--drafter", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", type=positive_ints, default=[1, 8, 32])
    ap.add_argument("--engine-batch", type=positive_ints, default=[1, 8], help="batch sizes of step 2")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    prompts = prompts_for(args.bf16, 48)
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "hardware": {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "drafter": json.loads((args.drafter / "config.json").read_text()),
        "equality": {},
        "drafting_graphs": {},
        "variants": {},
    }
    for name, w in (("bf16", args.bf16), ("fp8", args.fp8)):
        result["equality"][name] = greedy_equality(w, args.drafter, prompts[:16], 128, args.device)
        print(name, "greedy equality:", result["equality"][name], flush=True)
    for name, w in (("bf16", args.bf16), ("fp8", args.fp8)):
        result["drafting_graphs"][name] = drafting_graphs_ab(
            w, args.drafter, prompts[:16], args.max_tokens, args.device, args.engine_batch
        )
    logs = Path(tempfile.mkdtemp(prefix="spec-serve-"))
    spec = ["--drafter", str(args.drafter), "--draft-len", "3"]
    for name, w, extra in (
        ("bf16", args.bf16, []),
        ("fp8", args.fp8, []),
        ("bf16+redrafter", args.bf16, spec),
        ("fp8+redrafter", args.fp8, spec),
    ):
        result["variants"][name] = r = serve_and_bench(name.replace("+", "-"), w, extra, prompts, args, logs)
        for lv in r["levels"]:
            m = lv["metrics"]
            print(
                f"{name:15s} c={lv['concurrency']:3d} output_tok_s {m['output_tok_s']:9.1f} tpot_ms_p50 "
                f"{m['tpot_ms_p50']:7.3f} accept_len_mean {m.get('accept_len_mean', float('nan')):.2f}",
                flush=True,
            )
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
