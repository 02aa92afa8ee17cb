"""Manifests of a run's inputs: what "up to date" means for ``prepare`` and everything after it.

A manifest lists, per split, the DICOM files with their sizes and modification times, the
layout that found them, and (train) the label file's content hash or (test) the sample
submission's. The Makefile writes them at parse time (``python -m pneumothorax.query
manifest``), *only when they change*: steps that depend on them rerun exactly when a file
was added, removed or replaced, or the labels were edited. Standard library only, so that
computing it costs Make a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import layout as layout_mod
from . import paths

SPLITS = ("train", "test")
# Each experiment's own record of the manifests a step reads (``models/<exp>/stamps/<name>.json``):
# prepare reads both, infer the test split. Make compares these, not the shared manifests, so that a
# manifest set back to what a step ran under (a test folder only a ``make -n`` saw) takes that step's
# time per experiment (:func:`pneumothorax.query._stamps`).
STEP_INPUTS: dict[str, tuple[str, ...]] = {"inputs": SPLITS, "test-inputs": ("test",)}


def file_hash(path: Path | None) -> str:
    """SHA-1 of a file's bytes (``none`` for no file)."""
    if path is None:
        return layout_mod.NONE
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(paths: list[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` per file."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append([str(path), stat.st_size, stat.st_mtime_ns])
    return out


def build(found: layout_mod.Layout) -> dict[str, dict[str, Any]]:
    """The train manifest (labelled DICOMs, labels, patient map) and the test manifest (test DICOMs, sample)."""
    described = found.describe()
    labelled = layout_mod.label_ids(found.labels) if found.labels.suffix == ".csv" else None
    train_files = [
        p for p in layout_mod.walk_dicoms(found.train_dirs, found.exclude) if labelled is None or p.stem in labelled
    ]
    test_files = layout_mod.walk_dicoms([found.test_dir]) if found.test_dir is not None else []
    return {
        "train": {
            "layout": {k: described[k] for k in ("kind", "labels", "train_dirs")},
            "labels_sha1": file_hash(found.labels),
            "patient_map_sha1": file_hash(
                found.patient_map if found.patient_map and found.patient_map.exists() else None
            ),
            "files": file_entries(train_files),
        },
        "test": {
            "layout": {k: described[k] for k in ("kind", "test_dir", "sample_submission")},
            "sample_sha1": file_hash(found.sample_submission),
            "files": file_entries(test_files),
        },
    }


def path_for(processed: Path, split: str) -> Path:
    """``<processed>/inputs-<split>.json``."""
    return paths.ProcessedDir(processed).inputs(split)


def digest(processed: Path, split: str = "train") -> str:
    """What the folds and each training run record of the inputs they learnt from (``none`` without a
    manifest): a hash of the split's files by name, size and modification time, and of the label and
    patient-map hashes, not of where they lie. A replaced DICOM or an edited label file changes it;
    the data folder moved with its times (``mv``, ``cp -a``) does not."""
    path = path_for(Path(processed), split)
    if not path.exists():
        return layout_mod.NONE
    content = json.loads(path.read_text())
    identity = {key: value for key, value in content.items() if key not in ("files", "layout")}
    identity["files"] = sorted([Path(name).name, *rest] for name, *rest in content.get("files", []))
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def hashes(processed: Path) -> dict[str, str]:
    """The SHA-1 of each split's manifest text (``none`` without one): what the steps' inputs stamps
    hold, so any change a manifest records (a file, a time, a label hash, the layout) changes them."""
    out = {}
    for split in SPLITS:
        path = path_for(processed, split)
        out[split] = hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else layout_mod.NONE
    return out


def newest_time(processed: Path, splits: tuple[str, ...]) -> int | None:
    """The newest modification time (ns) among the splits' manifests, None without any."""
    found = [path for path in (path_for(processed, s) for s in splits) if path.exists()]
    return max((path.stat().st_mtime_ns for path in found), default=None)


def write_if_changed(path: Path, content: dict[str, Any]) -> bool:
    """Write ``content`` as JSON unless the file already holds exactly it; True if written."""
    text = json.dumps(content, indent=1, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def update(found: layout_mod.Layout, processed: Path) -> dict[str, bool]:
    """Write both manifests under ``processed`` where they changed; which ones were written."""
    return {split: write_if_changed(path_for(processed, split), m) for split, m in build(found).items()}
