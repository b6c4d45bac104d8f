"""The drafter's training data: token rows rendered like NeMo-Skills' train_redrafter, and their fingerprint.

Two modes (`drafter.data_mode`):

- `solutions`: problems with solutions, each row the chat template over [system], user, assistant (the
  solution). Sources: `tiny` (the synthetic generator `mathforge.data.problem_gen`: `data_nrows` new problems,
  none of them in a shipped split, with the tool-integrated reference solutions the tiny model was trained to
  write, their output blocks holding what `print(answer)` shows, which is what the sandbox prints); a Hugging
  Face dataset id (nvidia/OpenMathReasoning style: `problem` + `generated_solution`, `data_split`,
  `data_revision`, the first `data_nrows` rows streamed); or a local .jsonl/.parquet file.
- `generations`: the base model's own greedy generations for the problems of the same sources (the AIMO-2
  recipe: the drafter learns what the base writes). The base runs in-process (`mathforge.engine.Engine`)
  without executing tool calls: after `</tool_call>` it goes on writing, as a served model does when the
  client does not run the code. The rows are the prompt's tokens plus the generated tokens themselves.

Labels are every non-pad token (NeMo-Skills: the prompt is trained too). Each row also records which tokens
the base writes when it is served (the assistant turn minus sandbox output blocks): the simulated acceptance
length is measured on those.

`fingerprint(settings)` is what the drafter's recipe key depends on: the generator's source digest and
parameters for `tiny`, the sha256 of a local file's contents (not its path or mtime), the resolved commit sha
of a hub dataset's revision (offline from the local HF cache), plus the same for the held-out set.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathforge.config import DrafterSettings
from mathforge.data.problems import TINY_PROBLEMS_FILE, read_rows
from mathforge.errors import UserError
from mathforge.hub import file_sha256, hub_offline, is_repo_id, looks_like_path, resolve_commit

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when rendering or selection changes (it is in every drafter's recipe key)
TINY_DEFAULT_ROWS = 2000
TINY_SEED = (
    8_000_001  # the drafter's synthetic problems: not the shipped file's seed, not the model's TRAIN_SEED
)
PROBLEM_FIELDS = ("problem", "question")
SOLUTION_FIELDS = ("generated_solution", "generation", "reference_solution", "solution")


@dataclass(frozen=True)
class Example:
    problem: str
    solution: str | None = None  # None: the base writes it (generations mode)


@dataclass
class Row:
    """One training/evaluation sequence: token ids (labels = all of them) and which tokens the base writes."""

    ids: list[int]
    generated: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


# ------------------------------------------------------------------------------------------------ sources


def source_kind(source: str, what: str = "drafter.data_source") -> str:
    """`tiny`, `file` (a local .jsonl/.parquet) or `hub` (a HF dataset id); anything else is a UserError."""
    if source == "tiny":
        return "tiny"
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".parquet"):
            raise UserError(f"{what} {path}: unsupported file type; use a .jsonl or .parquet file")
        return "file"
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; name a .jsonl or .parquet file")
    if looks_like_path(source) or not is_repo_id(source) or "/" not in source:
        raise UserError(
            f"{what} {source!r} is not 'tiny', not an existing .jsonl/.parquet file and not a Hugging Face "
            "dataset id (org/name)"
        )
    return "hub"


def check_settings(settings: DrafterSettings) -> tuple[str, str]:
    """The kinds of the training and held-out sources; raises UserError for settings that cannot work."""
    kind = source_kind(settings.data_source)
    eval_kind = source_kind(settings.eval_source, "drafter.eval_source")
    if kind == "tiny" and settings.data_split is not None:
        raise UserError(
            "drafter.data_split applies to a HF dataset or a local file; the tiny generator draws "
            "drafter.data_nrows new problems (leave data_split unset)"
        )
    if settings.data_revision is not None and kind != "hub":
        raise UserError("drafter.data_revision applies to a Hugging Face dataset id only")
    if eval_kind == "hub":
        raise UserError(
            "drafter.eval_source must be 'tiny' (the shipped problems) or a local .jsonl/.parquet"
        )
    return kind, eval_kind


def tiny_generator_version() -> str:
    """sha256 of the generator's source: a changed family means new training data."""
    from mathforge.data import problem_gen

    return file_sha256(Path(problem_gen.__file__))


def _source_fingerprint(
    kind: str, source: str, split: str | None, nrows: int | None, revision: str | None
) -> dict:
    if kind == "tiny":
        return {
            "kind": "tiny-generator",
            "generator": tiny_generator_version(),
            "seed": TINY_SEED,
            "nrows": nrows or TINY_DEFAULT_ROWS,
        }
    if kind == "tiny-problems":
        return {
            "kind": "tiny-problems",
            "sha256": file_sha256(TINY_PROBLEMS_FILE),
            "split": split,
            "nrows": nrows,
        }
    if kind == "file":
        return {
            "kind": "file",
            "sha256": file_sha256(Path(source).expanduser()),
            "split": split,
            "nrows": nrows,
        }
    commit = resolve_commit(source, revision, repo_type="dataset")
    return {
        "kind": "hub",
        "repo_id": source,
        "revision": revision,
        "commit": commit,
        "split": split,
        "nrows": nrows,
    }


def fingerprint(settings: DrafterSettings) -> dict[str, Any]:
    """What the drafter's data is, by content: never a path or an mtime (module docstring)."""
    kind, eval_kind = check_settings(settings)
    return {
        "format": FORMAT_VERSION,
        "mode": settings.data_mode,
        "train": _source_fingerprint(
            kind, settings.data_source, settings.data_split, settings.data_nrows, settings.data_revision
        ),
        "eval": _source_fingerprint(
            "tiny-problems" if eval_kind == "tiny" else eval_kind,
            settings.eval_source,
            settings.eval_split,
            settings.eval_nrows,
            None,
        ),
    }


# ------------------------------------------------------------------------------------------------ examples


def tiny_examples(nrows: int, seed: int = TINY_SEED) -> list[Example]:
    """`nrows` new synthetic problems (none in a shipped split) with their tool-integrated reference solutions."""
    from mathforge.data.problem_gen import draw, printed_form, reference_solution, shipped_problem_texts

    drawn = draw(random.Random(seed), nrows, shipped_problem_texts())
    return [Example(g.problem, reference_solution(g, printed_form(g.answer) + "\n")) for _, g in drawn]


def _pick(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _examples_from_rows(rows: list[dict], where: str, need_solution: bool) -> list[Example]:
    columns = sorted({k for r in rows for k in r})
    pfield = _pick(columns, PROBLEM_FIELDS)
    sfield = _pick(columns, SOLUTION_FIELDS)
    if pfield is None:
        raise UserError(
            f"{where} has no problem column ({' or '.join(PROBLEM_FIELDS)}); columns: {', '.join(columns)}"
        )
    if need_solution and sfield is None:
        raise UserError(
            f"{where} has no solution column ({' / '.join(SOLUTION_FIELDS)}); columns: {', '.join(columns)}; "
            "data_mode solutions needs one (data_mode generations needs only problems)"
        )
    out = []
    for r in rows:
        problem = r.get(pfield)
        solution = r.get(sfield) if sfield else None
        if problem is None or not str(problem).strip():
            continue
        if need_solution and (solution is None or not str(solution).strip()):
            continue
        out.append(Example(str(problem), str(solution) if need_solution else None))
    if not out:
        raise UserError(
            f"{where} has no usable rows (empty problem{' or solution' if need_solution else ''})"
        )
    return out


def _file_rows(path: Path, split: str | None, nrows: int | None) -> list[dict]:
    rows = read_rows(path)
    if split is not None:
        splits = sorted({str(r["split"]) for r in rows if r.get("split") is not None})
        if split not in splits:
            have = (
                ", ".join(splits)
                if splits
                else "none (the file has no 'split' column; leave the split unset)"
            )
            raise UserError(f"unknown split {split!r} in {path}; splits: {have}")
        rows = [r for r in rows if str(r.get("split")) == split]
    return rows[:nrows] if nrows else rows


def _hub_rows(repo_id: str, split: str | None, commit: str | None, nrows: int | None) -> list[dict]:
    """The first `nrows` rows of a hub split, streamed as NeMo-Skills does (offline: from the datasets cache)."""
    import datasets

    split = split or "train"
    try:
        if nrows and not hub_offline():
            from itertools import islice

            stream = datasets.load_dataset(repo_id, split=split, revision=commit, streaming=True)
            return list(islice(iter(stream), nrows))
        ds = datasets.load_dataset(repo_id, split=split, revision=None if hub_offline() else commit)
        if nrows:
            ds = ds.select(range(min(nrows, len(ds))))
        return ds.to_list()
    except Exception as exc:  # datasets raises many types (missing split, network, cache miss)
        raise UserError(
            f"cannot load dataset {repo_id!r} split {split!r}: {type(exc).__name__}: {exc}"
        ) from exc


def load_examples(
    settings: DrafterSettings, *, commit: str | None = None, locator: str | None = None
) -> list[Example]:
    """The training problems (and solutions, in solutions mode). `locator`: where the source is (default
    `settings.data_source`); `commit`: a hub dataset's resolved commit."""
    kind, _ = check_settings(settings)
    need = settings.data_mode == "solutions"
    source = locator or settings.data_source
    if kind == "tiny":
        return tiny_examples(settings.data_nrows or TINY_DEFAULT_ROWS)
    if kind == "file":
        path = Path(source).expanduser()
        return _examples_from_rows(
            _file_rows(path, settings.data_split, settings.data_nrows), str(path), need
        )
    commit = commit or resolve_commit(source, settings.data_revision, repo_type="dataset")
    rows = _hub_rows(source, settings.data_split, commit, settings.data_nrows)
    return _examples_from_rows(rows, f"dataset {source}", need)


def load_eval_examples(settings: DrafterSettings) -> list[Example]:
    """The held-out problems (with solutions unless the base is to write them)."""
    _, eval_kind = check_settings(settings)
    path = TINY_PROBLEMS_FILE if eval_kind == "tiny" else Path(settings.eval_source).expanduser()
    rows = _file_rows(path, settings.eval_split, settings.eval_nrows)
    return _examples_from_rows(rows, str(path), settings.data_mode == "solutions")


# ------------------------------------------------------------------------------------------------ rendering


def _messages(settings: DrafterSettings, problem: str) -> list[dict[str, str]]:
    from mathforge.data.prompts import math_user_message

    user = problem if settings.prompt == "raw" else math_user_message(problem, tools=settings.prompt == "tir")
    system = [] if settings.system is None else [{"role": "system", "content": settings.system}]
    return [*system, {"role": "user", "content": user}]


def _apply(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):  # NeMo-Skills' fallback: bos + the contents
        bos = getattr(tokenizer, "bos_token", None) or ""
        return bos + "".join(m["content"] for m in messages if m["role"] in ("user", "assistant"))
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer: Any, settings: DrafterSettings, problem: str) -> str:
    """The prompt a served base gets for this problem (assistant turn opened)."""
    return _apply(tokenizer, _messages(settings, problem), add_generation_prompt=True)


def render_example(tokenizer: Any, settings: DrafterSettings, problem: str, solution: str) -> str:
    """The whole row text: [system], user, assistant (closed by the template's end of turn)."""
    messages = [*_messages(settings, problem), {"role": "assistant", "content": solution}]
    return _apply(tokenizer, messages, add_generation_prompt=False)


def _generated_spans(text: str, solution: str) -> list[tuple[int, int]]:
    """Character spans the base writes when served: the solution and the end-of-turn right after it, minus the
    sandbox's output blocks (a served model stops at `</tool_call>`; the client appends the output)."""
    from mathforge.train.data import output_spans

    start = text.rfind(solution)
    if start < 0:
        return []
    stop = start + len(solution)
    eot = text[stop:].split("\n", 1)[0]  # the template's end-of-turn marker (`<|im_end|>`), if any
    stop += len(eot)
    spans, pos = [], start
    for s, e in output_spans(text[start:stop]):
        spans.append((pos, start + s))
        pos = start + e
    spans.append((pos, stop))
    return [(a, b) for a, b in spans if b > a]


def encode_solutions(
    tokenizer: Any, settings: DrafterSettings, examples: Sequence[Example]
) -> tuple[list[Row], int]:
    """Rows for (problem, solution) examples, truncated to max_seq_len; also how many were truncated."""
    texts = [render_example(tokenizer, settings, e.problem, e.solution or "") for e in examples]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        marks = []
        for text, e, offsets in zip(texts, examples, enc["offset_mapping"], strict=True):
            spans = _generated_spans(text, e.solution or "")
            marks.append([any(a <= s < b for a, b in spans) for s, _ in offsets])
    else:  # no offsets: everything after the prompt counts as written by the base
        enc = tokenizer(texts, add_special_tokens=False)
        marks = []
        for e, ids in zip(examples, enc["input_ids"], strict=True):
            n = len(
                tokenizer(render_prompt(tokenizer, settings, e.problem), add_special_tokens=False)[
                    "input_ids"
                ]
            )
            marks.append([i >= n for i in range(len(ids))])
    rows, truncated = [], 0
    for ids, generated in zip(enc["input_ids"], marks, strict=True):
        if len(ids) > settings.max_seq_len:
            truncated += 1
            ids, generated = ids[: settings.max_seq_len], generated[: settings.max_seq_len]
        rows.append(Row(list(ids), generated))
    return rows, truncated


def generate_rows(
    model: Any,
    tokenizer: Any,
    settings: DrafterSettings,
    problems: Sequence[Example],
    *,
    eos_token_ids: Sequence[int] | None = None,
    max_slots: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Row], list[dict], int]:
    """The base's greedy generations (no tool execution): rows of prompt + generated token ids, the records
    (problem, generated_solution, finish_reason) and how many rows were cut at max_seq_len."""
    from mathforge.engine.api import SamplingParams
    from mathforge.engine.engine import Engine

    prompts = [
        tokenizer(render_prompt(tokenizer, settings, p.problem), add_special_tokens=False)["input_ids"]
        for p in problems
    ]
    longest = max(len(p) for p in prompts)
    if longest >= settings.max_seq_len:
        raise UserError(
            f"a prompt has {longest} tokens, at least drafter.max_seq_len ({settings.max_seq_len}): raise max_seq_len"
        )
    context = min(settings.max_seq_len, model.config.max_position_embeddings)
    engine = Engine(
        model, tokenizer, max_slots=max_slots, max_model_len=context, eos_token_ids=eos_token_ids, kv_block=64
    )
    rows: list[Row] = []
    records: list[dict] = []
    truncated = 0
    chunk = max_slots * 4
    for start in range(0, len(prompts), chunk):
        batch = prompts[start : start + chunk]
        params = [
            SamplingParams(max_tokens=min(settings.generation_max_tokens, context - len(p)), temperature=0.0)
            for p in batch
        ]
        for p, prompt, out in zip(
            problems[start : start + chunk], batch, engine.generate(batch, params), strict=True
        ):
            ids = list(prompt) + list(out.token_ids)
            if out.finish_reason == "length" and len(ids) >= context:
                truncated += 1
            rows.append(Row(ids, [False] * len(prompt) + [True] * len(out.token_ids)))
            records.append(
                {"problem": p.problem, "generated_solution": out.text, "finish_reason": out.finish_reason}
            )
        if progress is not None:
            progress(min(start + chunk, len(prompts)), len(prompts))
    return rows, records, truncated
