"""FP8 calibration data: a directory holding `calibration.parquet` with one column, `text`.

That is the layout TensorRT-LLM's `quantize.py --calib_dataset <dir>` loads (`load_dataset(dir, split="train")`
takes a lone parquet file as the `train` split and reads its `text` column), and what the torch backend's
calibration reads too. Nothing else is written into the directory, so the `train` split stays unambiguous.

Each row is one problem rendered like NeMo-Skills' calibration recipe: the `generic/math` user message through
the tokenizer's chat template (no system message). When the source row has a solution, the first present of
`generated_solution`, `generation`, `reference_solution`, `solution` becomes a closed assistant turn (the
recipe calibrates on prompt + `generated_solution`); otherwise the text ends with the opened assistant turn,
exactly the prompt a server receives.

Sources:
- "tiny": the shipped problems (split "calibration" unless another is named);
- a local .jsonl or .parquet file (`split` filters on its `split` column, which must then exist);
- a local directory: a `datasets` `save_to_disk` directory, or any directory `load_dataset(dir)` reads
  (split default "train");
- a Hugging Face dataset id: `datasets.load_dataset(id, split=..., revision=<resolved commit>)` (split default
  "train"; offline this uses the datasets cache). `split="name[:N]"` is read by streaming the first N rows
  (online) instead of downloading the whole split, as the NeMo-Skills recipe does.

Selection: rows are ordered by sha256(f"{seed}:{row index}") and the first `num_samples` non-empty ones are
kept, in that order; stable across runs, machines and Python versions. When the source has fewer usable rows
than `num_samples`, all of them are used and the summary says so (`short: true`, `note`); no usable row at all
is an error. The parquet is byte-identical for identical inputs and library versions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mathforge.data.problems import TINY_PROBLEMS_FILE, read_rows
from mathforge.errors import UserError
from mathforge.hub import file_sha256, is_repo_id, looks_like_path, resolve_commit, tree_digest

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.parquet"
FORMAT_VERSION = 1  # bump when the rendering or selection changes (part of the recipe key)
PROBLEM_FIELDS = ("problem", "question")
SOLUTION_FIELDS = ("generated_solution", "generation", "reference_solution", "solution")
TINY_DEFAULT_SPLIT = "calibration"
_STREAM_SLICE = re.compile(r"^([A-Za-z0-9_.-]+)\[:(\d+)\]$")


@dataclass
class _Rows:
    """A source's rows: count, column names, and a fetch of rows by index."""

    n: int
    columns: list[str]
    fetch: Callable[[list[int]], list[dict]]
    split: str | None


def _source_kind(source: str) -> str:
    if source == "tiny":
        return "tiny"
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".parquet"):
            raise UserError(
                f"calibration source {path}: unsupported file type; use a .jsonl or .parquet file"
            )
        return "file"
    if path.is_dir():
        return "dir"
    if looks_like_path(source) or not is_repo_id(source):
        raise UserError(
            f"unknown calibration source {source!r}: not 'tiny', not an existing .jsonl/.parquet file or "
            "dataset directory, and not a Hugging Face dataset id (org/name)"
        )
    return "hub"


def source_fingerprint(source: str, revision: str | None = None, split: str | None = None) -> dict:
    """What a calibration cache key must depend on: content digests or the resolved Hub commit, and the split."""
    source = str(source)
    kind = _source_kind(source)
    if kind == "tiny":
        return {
            "kind": "tiny",
            "sha256": file_sha256(TINY_PROBLEMS_FILE),
            "split": split or TINY_DEFAULT_SPLIT,
        }
    if kind == "file":
        return {"kind": "file", "sha256": file_sha256(Path(source).expanduser()), "split": split}
    if kind == "dir":
        return {"kind": "dir", "sha256": tree_digest(Path(source).expanduser()), "split": split}
    commit = resolve_commit(source, revision, repo_type="dataset")
    return {"kind": "hub", "repo_id": source, "revision": revision, "commit": commit, "split": split}


def _list_rows(rows: list[dict], split: str | None, where: str) -> _Rows:
    if split is not None:
        splits = sorted({str(r["split"]) for r in rows if r.get("split") is not None})
        if split not in splits:
            have = ", ".join(splits) if splits else "none (it has no 'split' column; omit the split)"
            raise UserError(f"unknown split {split!r} in {where}; splits: {have}")
        rows = [r for r in rows if str(r.get("split")) == split]
    columns = sorted({k for r in rows for k in r})
    return _Rows(n=len(rows), columns=columns, fetch=lambda idx: [rows[i] for i in idx], split=split)


def _dataset_rows(ds, split: str | None) -> _Rows:
    return _Rows(
        n=len(ds), columns=list(ds.column_names), fetch=lambda idx: ds.select(idx).to_list(), split=split
    )


def _load_dir(path: Path, split: str | None) -> _Rows:
    import datasets

    try:
        if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
            dd = datasets.load_from_disk(str(path))
            split = split or "train"
            if split not in dd:
                raise UserError(f"unknown split {split!r} in {path}; splits: {', '.join(sorted(dd))}")
            return _dataset_rows(dd[split], split)
        if (path / "state.json").is_file():  # Dataset.save_to_disk: a single split
            if split is not None:
                raise UserError(f"{path} holds a single saved Dataset (no splits); omit the split")
            return _dataset_rows(datasets.load_from_disk(str(path)), None)
        split = split or "train"
        return _dataset_rows(datasets.load_dataset(str(path), split=split), split)
    except UserError:
        raise
    except ValueError as exc:  # datasets: 'Unknown split "x". Should be one of [...]'
        raise UserError(f"cannot load calibration data from {path}: {exc}") from exc
    except Exception as exc:
        raise UserError(f"cannot load calibration data from {path}: {type(exc).__name__}: {exc}") from exc


def _load_hub(repo_id: str, split: str | None, commit: str) -> _Rows:
    import datasets

    from mathforge.hub import hub_offline

    split = split or "train"
    try:
        m = _STREAM_SLICE.match(split)
        if m and not hub_offline():
            from itertools import islice

            stream = datasets.load_dataset(repo_id, split=m.group(1), revision=commit, streaming=True)
            rows = list(islice(iter(stream), int(m.group(2))))
            listed = _list_rows(rows, None, repo_id)
            listed.split = split
            return listed
        ds = datasets.load_dataset(repo_id, split=split, revision=None if hub_offline() else commit)
        return _dataset_rows(ds, split)
    except ValueError as exc:
        raise UserError(f"cannot load dataset {repo_id!r} split {split!r}: {exc}") from exc
    except Exception as exc:
        raise UserError(
            f"cannot load dataset {repo_id!r} split {split!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _open(source: str, kind: str, split: str | None, commit: str | None) -> _Rows:
    if kind == "tiny":
        return _list_rows(read_rows(TINY_PROBLEMS_FILE), split or TINY_DEFAULT_SPLIT, "the tiny problem set")
    if kind == "file":
        path = Path(source).expanduser()
        return _list_rows(read_rows(path), split, str(path))
    if kind == "dir":
        return _load_dir(Path(source).expanduser(), split)
    return _load_hub(source, split, commit)


def _order(n: int, seed: int) -> list[int]:
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def _pick_field(columns: list[str], wanted: str | None, candidates: tuple[str, ...], source: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(
                f"calibration source {source} has no column {wanted!r}; columns: {', '.join(columns) or 'none'}"
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise UserError(
        f"calibration source {source} has no problem column ({' or '.join(candidates)}); columns: "
        f"{', '.join(columns) or 'none'}; name the column holding the problem text with text_field "
        "(the calibration text-field option)"
    )


def write_text_parquet(texts: list[str], path: Path) -> None:
    """A single-column (`text`) parquet, written atomically with fixed settings (same input, same bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(texts, type=pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".parquet", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=3, row_group_size=65536)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_calibration(
    source: str,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    num_samples: int,
    seed: int,
    split: str | None = None,
    text_field: str | None = None,
    revision: str | None = None,
) -> dict:
    """Write `out_dir/calibration.parquet` (column `text`) and return a JSON-able summary of what went in."""
    from mathforge.checkpoint import load_tokenizer
    from mathforge.data.prompts import render_chat, render_chat_with_response

    source = str(source)
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1 (got {num_samples})")
    kind = _source_kind(source)
    if revision is not None and kind != "hub":
        raise UserError(f"revision applies to Hugging Face dataset ids, not to calibration source {source!r}")
    fingerprint = source_fingerprint(source, revision=revision, split=split)
    rows = _open(source, kind, split, fingerprint.get("commit"))
    problem_field = _pick_field(rows.columns, text_field, PROBLEM_FIELDS, source)
    solution_field = next((c for c in SOLUTION_FIELDS if c in rows.columns and c != problem_field), None)

    order = _order(rows.n, seed)
    chosen: list[dict] = []
    skipped = 0
    pos = 0
    while len(chosen) < num_samples and pos < len(order):
        batch = order[pos : pos + (num_samples - len(chosen))]
        pos += len(batch)
        for row in rows.fetch(batch):
            problem = row.get(problem_field)
            if problem is None or not str(problem).strip():
                skipped += 1
                continue
            chosen.append(row)
    if not chosen:
        raise UserError(f"calibration source {source} has no usable rows (column {problem_field!r} is empty)")

    tokenizer = load_tokenizer(tokenizer_dir)
    texts = []
    for row in chosen:
        problem = str(row[problem_field])
        solution = row.get(solution_field) if solution_field else None
        if solution is not None and str(solution).strip():
            texts.append(render_chat_with_response(tokenizer, problem, str(solution)))
        else:
            texts.append(render_chat(tokenizer, problem, tools=False))

    out_path = Path(out_dir) / CALIBRATION_FILE
    write_text_parquet(texts, out_path)
    summary = {
        "file": CALIBRATION_FILE,
        "num_samples": len(texts),
        "requested_samples": num_samples,
        "available_rows": rows.n,
        "skipped_empty": skipped,
        "short": len(texts) < num_samples,
        "seed": seed,
        "source": source,
        "split": rows.split,
        "fingerprint": fingerprint,
        "problem_field": problem_field,
        "solution_field": solution_field,
        "format_version": FORMAT_VERSION,
        "sha256": file_sha256(out_path),
    }
    if summary["short"]:
        summary["note"] = (
            f"source has {len(texts)} usable rows, fewer than the {num_samples} requested; all of them are used"
        )
        log.warning("calibration: %s", summary["note"])
    return summary
