"""Markdown tables for reports, leaderboards and benchmark summaries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def markdown_table(columns: Iterable[str], rows: Iterable[Iterable[Any]], digits: int | None = None) -> str:
    """A GitHub-markdown table; missing values (None, NaN) are blank, floats get ``digits`` decimals."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):  # NaN is the one value unequal to itself
            return ""
        return f"{value:.{digits}f}" if digits is not None and isinstance(value, float) else str(value)

    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
