"""`mathforge bench`: latency/throughput of any OpenAI-compatible server, measured from the client."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> list[int]:
    """argparse type for `1,8,32`: concurrency levels, batch sizes."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (TTFT, TPOT, ITL, throughput; concurrency sweep)",
        description="Streamed /v1/completions requests against any OpenAI-compatible server (mathforge "
        "serve, vLLM, trtllm-serve, SGLang); metrics as `vllm bench serve`.",
    )
    p.add_argument(
        "--base-url", required=True, help="server root or OpenAI API root, e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument("--model", required=True, help="model name to send")
    p.add_argument(
        "--num-prompts", type=int, default=16, help="measured requests per concurrency level (default 16)"
    )
    p.add_argument(
        "--concurrency",
        type=positive_ints,
        default=[1, 4, 8],
        help="comma-separated concurrency levels (default 1,4,8)",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured warm-up requests per level (default 2)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument(
        "--prompts",
        default=None,
        help="prompts file: .txt (one per line) or .jsonl (field 'prompt' or 'text'); default: "
        "the shipped tiny math problems in the generic/math prompt",
    )
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="let requests stop at EOS (default: send ignore_eos=true for comparable lengths)",
    )
    p.add_argument("--api-key", default=None, help="bearer token, if the server needs one")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)"
    )
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.set_defaults(func=cmd_bench)


def load_prompts(path: str | None) -> list[str]:
    import json
    from pathlib import Path

    from mathforge.errors import UserError

    if path is None:
        from mathforge.data.problems import load_problems
        from mathforge.data.prompts import math_user_message

        return [math_user_message(p.problem) for p in load_problems("tiny")]
    f = Path(path)
    if not f.is_file():
        raise UserError(f"prompts file {f} does not exist")
    lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
    if f.suffix == ".jsonl":
        out = []
        for i, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise UserError(f"{f}:{i}: not JSON: {exc}") from None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{f}:{i}: expected an object with a string 'prompt' or 'text'")
            out.append(text)
        lines = out
    if not lines:
        raise UserError(f"prompts file {f} has no prompts")
    return lines


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from mathforge.bench.run import run_benchmark_sync
    from mathforge.errors import UserError

    if args.num_prompts < 1 or args.max_tokens < 1 or args.warmup < 0:
        raise UserError("--num-prompts and --max-tokens must be >= 1, --warmup >= 0")
    prompts = load_prompts(args.prompts)
    results = run_benchmark_sync(
        args.base_url,
        args.model,
        prompts,
        concurrency_levels=args.concurrency,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        warmup=args.warmup,
        temperature=args.temperature,
        progress=sys.stderr.isatty(),
        ignore_eos=not args.no_ignore_eos,
        api_key=args.api_key,
        timeout=args.timeout,
    )
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")
    failed = sum(lv["metrics"]["failed"] for lv in results["levels"])
    completed = sum(lv["metrics"]["completed"] for lv in results["levels"])
    if completed == 0:
        first = next((r["error"] for lv in results["levels"] for r in lv["requests"] if r["error"]), None)
        raise UserError(f"every request failed (first error: {first})")
    return 1 if failed else 0


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{results['metadata']['model']} @ {results['metadata']['base_url']}")
    cols = [
        ("conc", None),
        ("ok/fail", None),
        ("req/s", "request_s"),
        ("out tok/s", "output_tok_s"),
        ("TTFT p50 ms", "ttft_ms_p50"),
        ("TTFT p99 ms", "ttft_ms_p99"),
        ("TPOT p50 ms", "tpot_ms_p50"),
        ("ITL p99 ms", "itl_ms_p99"),
        ("E2E p50 ms", "e2e_ms_p50"),
    ]
    for name, _ in cols:
        t.add_column(name, justify="right")
    for lv in results["levels"]:
        m = lv["metrics"]
        row = [str(lv["concurrency"]), f"{m['completed']}/{m['failed']}"]
        row += [f"{m[k]:.1f}" for _, k in cols[2:]]
        t.add_row(*row)
    Console().print(t)
