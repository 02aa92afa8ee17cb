"""What ``prepare`` wrote, read back by the later steps: the caches, its record and its report.

Kept apart from :mod:`pneumothorax.data.prepare` so that training, inference and scoring load no DICOM
decoder (pydicom with its plugins costs about half a second in every process that imports it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pneumothorax.io import layout as layout_mod
from pneumothorax.io import paths
from pneumothorax.io.errors import MissingFileError, PipelineError

RECORD_VERSION = 2


class PrepareError(PipelineError, RuntimeError):
    """Unreadable training files (all of them listed), missing or inconsistent inputs, or a dead worker."""


def empty_record() -> dict[str, Any]:
    return {"version": RECORD_VERSION, "sizes": [], "splits": {}}


def read_record(out_dir: Path) -> dict[str, Any]:
    """``prepare.json`` of ``out_dir``; an empty record when it is missing, unreadable or of another version."""
    path = paths.ProcessedDir(out_dir).record
    if not path.exists():
        return empty_record()
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return empty_record()
    return record if record.get("version") == RECORD_VERSION else empty_record()


NOTES = {
    "bad_train": "unreadable training files",
    "bad_test": "unreadable test files (each gets a -1 row)",
    "labels_without_image": "label rows whose image has no DICOM",
    "unlabelled_images": "training-side DICOMs without a label row (not used)",
    "duplicate_files": "extra copies of an image (the first in path order is used)",
    "conflicting_duplicates": "copies of one image with different file sizes (check them)",
    "train_test_overlap": "images both labelled and in the test folder",
    "sop_mismatch": "files whose name differs from their SOPInstanceUID",
    "extra_without_label": "extra training images without a row in their labels.csv (not used)",
    "extra_also_labelled": "extra training images that are also competition training images (used once, as those)",
    "non_uid_sop": "files have a non-UID SOPInstanceUID (stage-2 names like ID_0011fe81e): fine",
}


def summarize(report_path: Path) -> str:
    """One line per kind of finding in ``prepare-report.json``, with a count and an example."""
    report = json.loads(Path(report_path).read_text())
    lines = []
    for key, note in NOTES.items():
        value = report.get(key) or []
        if value:
            example = value[0]["path"] if isinstance(value[0], dict) else value[0]
            lines.append(f"{len(value):,} {note} (e.g. {example})")
    return "\n".join(lines) if lines else "no problems found"


def expected_test_ids(out_dir: str | Path) -> tuple[list[str], Path | None]:
    """The ids a submission must hold: the sample submission's (in its order) when the layout has one,
    else the prepared test images'; and the sample's path (or None)."""
    out_dir = Path(out_dir)
    record = read_record(out_dir)
    sample = record.get("layout", {}).get("sample_submission", layout_mod.NONE)
    if sample != layout_mod.NONE:
        if not Path(sample).exists():
            raise PrepareError(f"{sample}: the sample submission that prepare read is gone; rerun `make prepare`")
        return layout_mod.read_sample_ids(Path(sample)), Path(sample)
    return list(record.get("splits", {}).get("test", {}).get("ids", [])), None


def labels_path(out_dir: str | Path) -> Path:
    """The label CSV that prepare read (the original RLE rows: full-resolution scoring reads them)."""
    record = read_record(Path(out_dir))
    labels = record.get("layout", {}).get("labels")
    if not labels or not Path(labels).exists():
        raise PrepareError(f"{out_dir}: the label CSV that prepare read ({labels}) is gone; rerun `make prepare`")
    return Path(labels)


def load_cache(out_dir: str | Path, kind: str, split: str, size: int) -> np.ndarray:
    """Memory-map one cache read-only."""
    path = paths.ProcessedDir(Path(out_dir)).cache(kind, split, size)
    if not path.exists():
        raise MissingFileError(f"{path}: cache missing; run `make prepare` with size {size} in the config")
    return np.load(path, mmap_mode="r")
