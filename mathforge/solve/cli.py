"""`mathforge solve`: solve a problem set against any running OpenAI-compatible server (+ sandbox).

For ad-hoc runs against a server you started yourself (ours, trtllm-serve, vLLM). The pipeline's
`mathforge evaluate` serves the variants itself and calls the same `evaluate_problems`.
Prints progress on stderr and the metrics as one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "solve",
        help="solve a problem set against a running OpenAI-compatible server, with code execution",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--base-url", required=True, help="server URL, e.g. http://127.0.0.1:8000 (with or without /v1)"
    )
    p.add_argument("--model", help="model name to send (default: the first one /v1/models lists)")
    p.add_argument(
        "--tokenizer", required=True, help="HF checkpoint/tokenizer dir whose chat template renders prompts"
    )
    p.add_argument(
        "--sandbox-url", help="code sandbox URL (e.g. http://127.0.0.1:6000); omit for no code execution"
    )
    p.add_argument("--problems", default="tiny", help="'tiny' or a .jsonl/.parquet file (default: tiny)")
    p.add_argument("--split", help="only this split of the problem set (e.g. test)")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--out", help="JSONL output (default: $MATHFORGE_HOME/runs/solve-<time>.jsonl)")
    g = p.add_argument_group("sampling")
    g.add_argument("--samples", type=int, default=1, help="samples per problem (default 1)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    g.add_argument(
        "--tokens-to-generate", type=int, default=2048, help="token budget per solution, all turns"
    )
    g.add_argument("--concurrent-problems", type=int, default=1)
    g = p.add_argument_group("code execution")
    g.add_argument("--max-code-executions", type=int, default=8)
    g.add_argument("--code-execution-timeout", type=float, default=10.0)
    g.add_argument("--max-code-output-characters", type=int, default=1000)
    g.add_argument("--add-remaining-code-executions", action="store_true")
    g = p.add_argument_group("early stopping and time budget")
    g.add_argument("--stop-after-n-completed", type=int)
    g.add_argument("--stop-after-n-seconds", type=float)
    g.add_argument("--stop-after-n-same-answer", type=int)
    g.add_argument(
        "--time-budget-s", type=float, help="AIMO-2 style base seconds per problem (pooled if unused)"
    )
    g.add_argument("--time-budget-max-extra-s", type=float, help="most a problem may draw from the pool")
    p.set_defaults(func=cmd_solve)


def _first_model(base_url: str) -> str:
    import httpx

    from mathforge.errors import UserError

    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    try:
        data = httpx.get(f"{url}/models", timeout=10).json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise UserError(f"cannot list models at {url}/models ({exc}); pass --model") from exc
    if not data:
        raise UserError(f"{url}/models lists no model; pass --model")
    return data[0]["id"]


def cmd_solve(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from mathforge import paths
    from mathforge.checkpoint import load_tokenizer
    from mathforge.data.problems import load_problems
    from mathforge.data.prompts import render_chat
    from mathforge.errors import UserError
    from mathforge.progress import Progress
    from mathforge.solve.evaluate import evaluate_problems

    problems = load_problems(args.problems, split=args.split)
    if args.limit is not None:
        problems = problems[: max(args.limit, 0)]
    if not problems:
        raise UserError("no problems to solve")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except Exception as exc:
        raise UserError(f"cannot load a tokenizer from {args.tokenizer}: {exc}") from exc
    tools = args.sandbox_url is not None
    prompts = [
        render_chat(tokenizer, p.problem, tools=tools, total_code_executions=args.max_code_executions)
        for p in problems
    ]
    model = args.model or _first_model(args.base_url)
    out = Path(args.out) if args.out else paths.runs_dir() / f"solve-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    try:
        with Progress(f"solving {len(problems)} problems", total=len(problems)) as progress:
            metrics = _run(evaluate_problems, args, model, problems, prompts, out, progress)
    except ValueError as exc:  # a bad setting (samples < 1, ...)
        raise UserError(str(exc)) from exc
    print(f"rows: {out}")
    print(json.dumps(metrics))
    return 0


def _run(evaluate_problems, args, model, problems, prompts, out, progress) -> dict:
    return evaluate_problems(
        args.base_url,
        model,
        problems,
        prompts,
        sandbox_url=args.sandbox_url,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        tokens_to_generate=args.tokens_to_generate,
        max_code_executions=args.max_code_executions,
        code_execution_timeout=args.code_execution_timeout,
        max_code_output_characters=args.max_code_output_characters,
        add_remaining_code_executions=args.add_remaining_code_executions,
        stop_after_n_completed=args.stop_after_n_completed,
        stop_after_n_seconds=args.stop_after_n_seconds,
        stop_after_n_same_answer=args.stop_after_n_same_answer,
        time_budget_s=args.time_budget_s,
        time_budget_max_extra_s=args.time_budget_max_extra_s,
        concurrent_problems=args.concurrent_problems,
        out_jsonl=out,
        progress=progress,
    )
