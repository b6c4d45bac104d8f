"""Training data for the tiny model: sandbox-run synthetic problems, chat-rendered and tokenized with loss masks.

The data set is a gzipped JSONL of `mathforge.data.problem_gen` records (problem, expected answer, the
tool-integrated reference solution whose output block came from `mathforge sandbox`). `encode` turns one
record into token ids and labels the way the model is used at inference: the prompt (the chat template's user
turn and the opened assistant turn) and the code output block (which the sandbox, not the model, writes)
are not trained on; the reasoning, the code, `</tool_call>`, the answer sentence and `<|im_end|>` are.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathforge.data.prompts import OPENMATH_CODE_TAGS, render_chat_with_response

FORMAT_VERSION = 1
TRAIN_FILE = "train.jsonl.gz"
IGNORE = -100


def write_jsonl_gz(path: Path, records: Sequence[dict]) -> str:
    """Byte-reproducible gzip (mtime 0, no file name); returns the sha256 of the written file."""
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
        gz.write(raw)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_records(path: str | Path) -> list[dict]:
    """Records of a .jsonl or .jsonl.gz file, or of `train.jsonl.gz` inside a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAIN_FILE
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def generator_fingerprint() -> str:
    """sha256 of the problem generator's source: a changed family makes a new training-data recipe."""
    from mathforge.data import problem_gen

    return hashlib.sha256(Path(problem_gen.__file__).read_bytes()).hexdigest()


def build_training_data(out_dir: str | Path, num_train: int, seed: int, execute=None) -> dict[str, Any]:
    """Write `train.jsonl.gz` (problems disjoint from every shipped split) and `summary.json` into `out_dir`."""
    from mathforge.data.problem_gen import training_records

    out_dir = Path(out_dir)
    records = training_records(num_train, seed, execute=execute)
    digest = write_jsonl_gz(out_dir / TRAIN_FILE, records)
    summary = {
        "format_version": FORMAT_VERSION,
        "num_train": len(records),
        "seed": seed,
        "sha256": digest,
        "families": dict(sorted(Counter(r["source"].split("/")[-1] for r in records).items())),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def output_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the code output blocks (`\\n```output\\n ... ```\\n` after `</tool_call>`)."""
    begin, end = OPENMATH_CODE_TAGS["code_output_begin"], OPENMATH_CODE_TAGS["code_output_end"]
    spans, pos = [], 0
    marker = OPENMATH_CODE_TAGS["code_end"] + begin
    while True:
        i = text.find(marker, pos)
        if i < 0:
            return spans
        start = i + len(OPENMATH_CODE_TAGS["code_end"])
        stop = text.find(end, start + len(begin))
        stop = len(text) if stop < 0 else stop + len(end)
        spans.append((start, stop))
        pos = stop


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]  # IGNORE where not trained, else the token id (predicted from the one before)


PROMPT_END = "<|im_start|>assistant\n"
_PROBLEM, _SOLUTION = "\ue000problem\ue000", "\ue000solution\ue000"  # private-use markers
END_OF_TURN = "<|im_end|>"


def render(tokenizer: Any, problem: str, solution: str, *, tools: bool) -> str:
    """The whole training text through the checkpoint's own chat template (a transformers tokenizer)."""
    return render_chat_with_response(tokenizer, problem, solution, tools=tools)


def labels_for(text: str, solution: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Train the solution and its end-of-turn token (not the newline after it), minus the output blocks.

    A token belongs to a region when its first character does; regions are cut with bisect on the (sorted)
    token starts, so this is linear in the number of tokens."""
    start = text.rindex(PROMPT_END + solution) + len(PROMPT_END)
    stop = start + len(solution) + len(END_OF_TURN)
    starts = [a for a, _b in offsets]
    labels = [IGNORE] * len(ids)
    lo, hi = bisect_left(starts, start), bisect_left(starts, stop)
    labels[lo:hi] = ids[lo:hi]
    for s, e in output_spans(text):
        a, b = bisect_left(starts, s), bisect_left(starts, e)
        labels[a:b] = [IGNORE] * (b - a)
    return labels


def encode(tokenizer: Any, problem: str, solution: str, *, tools: bool) -> Encoded:
    """One example with a transformers (fast) tokenizer: ids and labels."""
    text = render(tokenizer, problem, solution, tools=tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return Encoded(ids=ids, labels=labels_for(text, solution, ids, enc["offset_mapping"]))


def encode_records(
    model_dir: str | Path,
    records: Sequence[dict],
    *,
    generic_prompt_fraction: float = 0.25,
    seed: int = 0,
    max_len: int | None = None,
) -> list[Encoded]:
    """Encode records with the checkpoint's tokenizer (rendering through its chat template, batch encoding in
    Rust). A seeded `generic_prompt_fraction` of them get the plain `generic/math` prompt (as
    OpenMath-Nemotron-Kaggle is prompted), the rest the `openmath/tir` prompt. Longer than `max_len`: dropped."""
    hf, fast = _tokenizers(str(Path(model_dir).resolve()))
    # The chat template puts the contents in verbatim: render it once per prompt kind around two markers
    # and fill those in (checked against a real rendering for each kind), instead of 100k jinja renders.
    frames = {tools: render(hf, _PROBLEM, _SOLUTION, tools=tools) for tools in (True, False)}
    checked: set[bool] = set()
    rng = random.Random(seed)
    texts, solutions = [], []
    for r in records:
        tools = rng.random() >= generic_prompt_fraction
        problem, solution = r["problem"], r["reference_solution"]
        text = frames[tools].replace(_PROBLEM, problem, 1).replace(_SOLUTION, solution, 1)
        if tools not in checked:
            if text != render(hf, problem, solution, tools=tools):
                raise RuntimeError("the chat template does not insert messages verbatim; cannot fast-render")
            checked.add(tools)
        texts.append(text)
        solutions.append(solution)
    out = []
    for text, solution, enc in zip(
        texts, solutions, fast.encode_batch(texts, add_special_tokens=False), strict=True
    ):
        if max_len is not None and len(enc.ids) > max_len:
            continue
        out.append(Encoded(ids=list(enc.ids), labels=labels_for(text, solution, enc.ids, enc.offsets)))
    return out


@functools.lru_cache(maxsize=4)
def _tokenizers(model_dir: str):
    """(transformers tokenizer for the chat template, `tokenizers.Tokenizer` for batch encoding)."""
    from tokenizers import Tokenizer

    from mathforge.checkpoint import load_tokenizer

    fast = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return load_tokenizer(model_dir), fast
