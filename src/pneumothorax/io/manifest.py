"""Manifests of a run's inputs: the data files each step reads, as ``prepare`` found them.

A manifest lists, per split, the DICOM files with their sizes and modification times, the
layout that found them, and (train) the label file's and patient map's content hashes or (test)
the sample submission's. ``prepare`` writes them into the processed folder (``inputs-train.json``,
``inputs-test.json``) where they changed; :mod:`pneumothorax.io.freshness` compares the ones built
now from ``DATA_DIR`` with what each step recorded, so a step reruns exactly when a file it reads
was added, removed or replaced, or the labels were edited. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pneumothorax.io import atomic, paths
from pneumothorax.io import layout as layout_mod

SPLITS = ("train", "test")
MASK_FOLDERS = ("mask", "masks")  # PNG masks beside extra images: not images to train on


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
    train = {
        "layout": {k: described[k] for k in ("kind", "labels", "train_dirs", "extra_dir")},
        "labels_sha1": file_hash(found.labels),
        "patient_map_sha1": file_hash(found.patient_map if found.patient_map and found.patient_map.exists() else None),
        "files": file_entries(train_files),
    }
    if found.extra_dir is not None:  # extra training images: the training inputs too
        train["extra_labels_sha1"] = file_hash(found.extra_labels)
        train["extra_files"] = file_entries(layout_mod.walk_images([found.extra_dir], skip=MASK_FOLDERS))
    return {
        "train": train,
        "test": {
            "layout": {k: described[k] for k in ("kind", "test_dir", "sample_submission")},
            "sample_sha1": file_hash(found.sample_submission),
            "files": file_entries(test_files),
        },
    }


def path_for(processed: Path, split: str) -> Path:
    """``<processed>/inputs-<split>.json``."""
    return paths.ProcessedDir(processed).inputs(split)


def text(content: dict[str, Any]) -> str:
    """A manifest's file text (keys sorted): what its SHA-1 is taken of, in memory or on disk alike."""
    return json.dumps(content, indent=1, sort_keys=True) + "\n"


def digest_of(train: dict[str, Any]) -> str:
    """What the folds and each training run record of the inputs they learnt from: a hash of the training
    manifest's files by name, size and modification time, and of the label and patient-map hashes, not of
    where they lie. A replaced DICOM or an edited label file changes it; the data folder moved with its
    times (``mv``, ``cp -a``) does not."""
    identity = {key: value for key, value in train.items() if key not in ("files", "extra_files", "layout")}
    for key in ("files", "extra_files"):
        if key in train:
            identity[key] = sorted([Path(name).name, *rest] for name, *rest in train[key])
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def digest(processed: Path) -> str:
    """:func:`digest_of` the training manifest in ``processed`` (``none`` without one)."""
    path = path_for(Path(processed), "train")
    return digest_of(json.loads(path.read_text())) if path.exists() else layout_mod.NONE


def hashes(processed: Path) -> dict[str, str]:
    """The SHA-1 of each split's manifest text in ``processed`` (``none`` without one)."""
    out = {}
    for split in SPLITS:
        path = path_for(processed, split)
        out[split] = hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else layout_mod.NONE
    return out


def write_if_changed(path: Path, content: dict[str, Any]) -> bool:
    """Write ``content`` as JSON unless the file already holds exactly it; True if written."""
    return atomic.write_text_if_changed(path, text(content))


def update(found: layout_mod.Layout, processed: Path) -> dict[str, bool]:
    """Write both manifests under ``processed`` where they changed; which ones were written."""
    return {split: write_if_changed(path_for(processed, split), m) for split, m in build(found).items()}
