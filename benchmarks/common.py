"""Helpers shared by the benchmarks: timing, results files, a small prepared world."""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pneumothorax.data import prepare, splitting, synthetic
from pneumothorax.io import atomic, layout, paths

RESULTS = paths.ROOT / "benchmarks" / "results"


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def save(name: str, results: dict[str, Any]) -> None:
    """Print and write ``benchmarks/results/<name>.json`` with the machine's description."""
    results = {
        "machine": {
            "cpu_count": torch.get_num_threads(),
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        **results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_json(RESULTS / f"{name}.json", results)
    print(json.dumps(results, indent=2))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux's VmHWM counts only this program, since its exec. ``ru_maxrss`` also keeps the RSS of the
    process it was forked from: a probe started by a large benchmark process reported that process's
    size (every probe read the same 1,736.6 MB)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux (bytes on macOS)


def write_prepare_record(processed: Path, test_ids: list[str], labels: Path | None = None) -> None:
    """The record `make prepare` leaves for a fake processed folder: the test ids a submission must
    hold (no sample submission), and the label CSV that full-resolution scoring reads, if any."""
    found = {"sample_submission": "none", **({"labels": str(labels)} if labels else {})}
    record = {"version": prepare.RECORD_VERSION, "layout": found, "splits": {"test": {"ids": test_ids}}}
    atomic.write_json(paths.ProcessedDir(processed).record, record)


def prepared_world(
    root: Path, n_train: int, n_test: int, sizes: tuple[int, ...], seed: int = 7, difficulty: str = "default"
) -> tuple[Path, Path]:
    """A synthetic world under ``root`` (``difficulty``: a setting of ``synthetic.DIFFICULTIES``) and its
    processed caches (with 5 folds)."""
    spec = synthetic.WorldSpec(n_train=n_train, n_test=n_test, seed=seed, **synthetic.DIFFICULTIES[difficulty])
    world = synthetic.make_world(root / "world", spec, progress=False)
    processed = root / "processed"
    meta = prepare.prepare(
        layout.detect(world, test_dir=None if n_test else "none", patient_map=world / "kaggle-to-nih-id.csv"),
        processed,
        sizes=sizes,
        progress=False,
    )
    atomic.write_csv(processed / "folds.csv", splitting.make_folds(meta[meta["split"] == "train"], 5, 0))
    return world, processed
