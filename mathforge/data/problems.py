"""Math problems with known answers: the shipped `tiny` set, or a local JSONL/Parquet file.

A file needs `problem` and `expected_answer` columns (NeMo-Skills' dataset fields); `id`, `split`, `source`
and `reference_solution` are used when present. Answers are kept as strings, as NeMo-Skills stores them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mathforge.errors import UserError

TINY_PROBLEMS_FILE = Path(__file__).resolve().parent / "problems" / "tiny.jsonl"
REQUIRED_COLUMNS = ("problem", "expected_answer")


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    expected_answer: str
    split: str | None = None
    source: str | None = None
    reference_solution: str | None = None


def problems_path(source: str | Path) -> Path:
    """The file behind a problem source ("tiny" = the shipped set)."""
    if str(source) == "tiny":
        return TINY_PROBLEMS_FILE
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"problem file not found: {path} (pass 'tiny' or a local .jsonl/.parquet file)")
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".parquet"):
        raise UserError(f"unsupported problem file {path}: expected a .jsonl or .parquet file")
    return path


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl or .parquet file as dicts."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise UserError(f"cannot read parquet file {path}: {exc}") from exc
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def _text(value) -> str | None:
    return None if value is None else str(value)


def load_problems(source: str | Path = "tiny", split: str | None = None) -> list[Problem]:
    """Problems from `source` ("tiny" or a .jsonl/.parquet path), optionally only one `split`, in file order."""
    path = problems_path(source)
    rows = read_rows(path)
    columns = sorted({k for r in rows for k in r})
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UserError(
            f"{path} has no {' / '.join(repr(c) for c in missing)} column "
            f"(columns: {', '.join(columns) or 'none'}); problems need 'problem' and 'expected_answer'"
        )
    if split is not None:
        splits = sorted({r["split"] for r in rows if r.get("split") is not None})
        if split not in splits:
            have = ", ".join(splits) if splits else "none (the file has no 'split' column; omit the split)"
            raise UserError(f"unknown split {split!r} in {path}; splits: {have}")
    stem = "tiny" if str(source) == "tiny" else path.stem
    out = []
    for i, r in enumerate(rows):
        if split is not None and r.get("split") != split:
            continue
        if r.get("problem") is None or r.get("expected_answer") is None:
            raise UserError(f"{path}: row {i} has an empty 'problem' or 'expected_answer'")
        out.append(
            Problem(
                id=_text(r.get("id")) or f"{stem}-{i}",
                problem=str(r["problem"]),
                expected_answer=str(r["expected_answer"]),
                split=_text(r.get("split")),
                source=_text(r.get("source")),
                reference_solution=_text(r.get("reference_solution")),
            )
        )
    return out
