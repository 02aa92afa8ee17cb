"""Progress that reads well in a terminal and in a log file.

On a terminal, a tqdm bar. Anywhere else (``make demo > log``, CI, SLURM output) carriage-return
frames would fill the file with thousands of partial lines, so the same loop prints one line
at every quarter of the work instead, and nothing for loops of a few items.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

STEPS = 4  # lines per loop when the output is not a terminal


def is_terminal() -> bool:
    """Whether progress goes to a terminal (stderr)."""
    return sys.stderr.isatty()


class Lines:
    """A counter that prints ``desc: done/total unit (percent, rate)`` at every quarter of ``total``."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.started, self.first = time.time(), initial
        self.marks = {max(1, round(total * k / STEPS)) for k in range(1, STEPS + 1)} if total >= 2 * STEPS else set()

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if any(before < mark <= self.done for mark in self.marks):
            rate = (self.done - self.first) / max(time.time() - self.started, 1e-9)
            percent = 100 * self.done // self.total
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent}%, {rate:.1f} {self.unit}/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        """Nothing to clear (tqdm's interface)."""


class Silent:
    """A counter that says nothing (progress off)."""

    def update(self, n: int = 1) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


def counter(total: int, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0) -> Any:
    """Something with ``update(n)`` and ``close()``: a bar on a terminal, quarter lines elsewhere, or silence."""
    if not enabled:
        return Silent()
    if is_terminal():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)
    return Lines(total, desc, unit, initial)


def bar(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``items``, with a progress bar on a terminal or a few plain lines elsewhere (none when not ``enabled``)."""
    if not enabled:
        return items
    if is_terminal():
        return tqdm(items, desc=desc, total=total, unit=unit, leave=False)
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    return _counted(items, Lines(total, desc, unit))


def _counted(items: Iterable[T], lines: Lines) -> Iterator[T]:
    for item in items:
        yield item
        lines.update()
