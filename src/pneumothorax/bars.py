"""Progress that reads well in a terminal and in a log file.

On a terminal, a tqdm bar. Anywhere else (``make demo > log``, CI, SLURM output) carriage-return
frames would fill the file with thousands of partial lines, so the same loop prints one line
at every quarter of the work instead, and nothing for loops of a few items.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

STEPS = 4  # lines per loop when the output is not a terminal


def is_terminal() -> bool:
    """Whether progress goes to a terminal (stderr)."""
    return sys.stderr.isatty()


def bar(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``items``, with a progress bar on a terminal or a few plain lines elsewhere (none when not ``enabled``)."""
    if not enabled:
        return items
    if is_terminal():
        return tqdm(items, desc=desc, total=total, unit=unit, leave=False)
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    return _lines(items, desc, total, unit)


def _lines(items: Iterable[T], desc: str, total: int, unit: str) -> Iterator[T]:
    marks = {max(1, round(total * k / STEPS)) for k in range(1, STEPS + 1)} if total >= 2 * STEPS else set()
    started = time.time()
    for done, item in enumerate(items, 1):
        yield item
        if done in marks:
            rate = done / max(time.time() - started, 1e-9)
            print(f"{desc}: {done}/{total} {unit} ({100 * done // total}%, {rate:.1f} {unit}/s)", file=sys.stderr)
