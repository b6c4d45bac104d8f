"""The comparison of variants as a table: rows for the terminal, the Prefect UI and the README."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def comparison_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per variant with the headline metrics and the ratio of throughput against the first variant."""
    base = rows[0]["metrics"].get("output_tok_s") if rows else None
    table = []
    for row in rows:
        entry: dict[str, Any] = {"variant": row["variant"]}
        for key in keys:
            value = row["metrics"].get(key)
            entry[key] = round(value, 2) if isinstance(value, float) else value
        tok_s = row["metrics"].get("output_tok_s")
        entry["speedup"] = round(tok_s / base, 2) if base and tok_s else None
        table.append(entry)
    return table


def print_comparison(table: Sequence[dict[str, Any]], title: str = "mathforge: variant comparison") -> None:
    from rich.console import Console
    from rich.table import Table

    if not table:
        return
    out = Table(title=title)
    for col in table[0]:
        out.add_column(col, justify="left" if col == "variant" else "right")
    for row in table:
        out.add_row(*("-" if v is None else str(v) for v in row.values()))
    Console(width=160).print(out)
