"""Where the raw SIIM-ACR data lies: today's download (stage 2) or the 2019 stage-1 layout, found from ``DATA_DIR``.

Today's competition download holds ``stage_2_images/ID_<9 hex>.dcm`` (the test set, one flat
folder), ``stage_2_train.csv`` (labels of the stage-1 train *and* test images) and
``stage_2_sample_submission.csv``; it has no training DICOMs. Those come from stage-1
re-uploads: ``dicom-images-train/<study>/<series>/<uid>.dcm`` and ``dicom-images-test/...``
(both training data in stage 2), sometimes under one extra folder (``siim/``), sometimes twice.
The stage-1 layout is ``train-rle.csv``, ``dicom-images-train/`` and ``dicom-images-test/`` (the
stage-1 test set).

The rule, for both: the label file decides the layout; the test folder is the layout's
(``stage_2_images`` or ``dicom-images-test``); every labelled DICOM anywhere else under
``DATA_DIR`` is training data, whatever folder holds it (the first copy in path order wins
when an image is found twice). Every name can be overridden; ``test_dir="none"`` asks for a
training-only run.

Extra training images (``EXTRA_DIR``, or a folder named ``extra/`` or ``extra-positives/``) are PNG,
JPEG or DICOM files with their own ``labels.csv``: every fold trains on them (but on those of its
validation patients), and none is ever validated on, so the out-of-fold score stays the competition's.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pneumothorax.io.errors import PipelineError

IMAGE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")

STAGE2_LABELS = "stage_2_train.csv"
STAGE1_LABELS = "train-rle.csv"
STAGE2_TEST = "stage_2_images"
STAGE1_TEST = "dicom-images-test"
SAMPLE_NAMES = ("stage_2_sample_submission.csv", "sample_submission.csv")
NONE = "none"
EXTRA_NAMES = ("extra", "extra-positives")  # folders of extra training images found without EXTRA_DIR
SEARCH_DEPTH = 2  # DATA_DIR itself and one extra folder (siim/, pneumothorax/, ...)


class LayoutError(PipelineError, ValueError):
    """Data that is not where the layout says, or not there at all; the message says what to set."""


@dataclass(frozen=True)
class Layout:
    """The files one run reads: labels, the folders holding training DICOMs, the test folder."""

    kind: str  # "stage2" (today's download), "stage1", or "custom" (labels named by the user)
    data_dir: Path
    labels: Path
    train_dirs: tuple[Path, ...]  # folders walked for labelled DICOMs
    test_dir: Path | None  # None: a training-only run, asked for explicitly
    sample_submission: Path | None = None
    patient_map: Path | None = None
    exclude: tuple[Path, ...] = field(default=())  # not walked for training files (the test and extra folders)
    extra_dir: Path | None = None  # extra training images (DICOM, PNG, JPEG), never validated on
    extra_labels: Path | None = None  # their label CSV (ImageId,EncodedPixels)

    def describe(self) -> dict[str, str]:
        """The layout as strings (for records and messages)."""
        return {
            "kind": self.kind,
            "labels": str(self.labels),
            "train_dirs": " ".join(str(p) for p in self.train_dirs),
            "test_dir": str(self.test_dir) if self.test_dir else NONE,
            "sample_submission": str(self.sample_submission) if self.sample_submission else NONE,
            "extra_dir": str(self.extra_dir) if self.extra_dir else NONE,
        }


@dataclass
class Found:
    """DICOMs of one split: image id -> path, and the extra copies that were left out."""

    files: dict[str, Path]
    duplicates: list[str] = field(default_factory=list)  # "<id>: <kept path> <other path>"
    conflicting: list[str] = field(default_factory=list)  # copies of one id whose sizes differ


def _near(data_dir: Path, name: str, want_dir: bool) -> list[Path]:
    """Files or folders called ``name`` in ``data_dir`` or one folder below, in path order."""
    hits = []
    candidates = [data_dir / name] + [d / name for d in sorted(data_dir.iterdir()) if d.is_dir()]
    for path in candidates:
        if (path.is_dir() if want_dir else path.is_file()) and not path.parent.name.startswith("."):
            hits.append(path)
    return hits


def _resolve(data_dir: Path, value: str | Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else data_dir / path


def detect(
    data_dir: str | Path,
    train_csv: str | Path | None = None,
    train_dirs: Sequence[str | Path] = (),
    test_dir: str | Path | None = None,
    sample_submission: str | Path | None = None,
    patient_map: str | Path | None = None,
    extra_dir: str | Path | None = None,
) -> Layout:
    """Find the layout under ``data_dir``; overrides (relative to ``data_dir`` or absolute) win.

    Raises:
        LayoutError: no label file, a missing override, no test folder (``test_dir="none"`` asks for a
            training-only run), or an extra folder without its label CSV.
    """
    # Absolute (symlinks kept): the manifests record these paths, and one folder spelt relative in one
    # command and absolute in the next must be the same inputs, not a re-prepare.
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise LayoutError(f"{data_dir}: DATA_DIR does not exist")
    labels, kind = _find_labels(data_dir, train_csv)
    test = _find_test_dir(data_dir, kind, test_dir)
    dirs = tuple(_resolve(data_dir, d) for d in train_dirs) or (data_dir,)
    for folder in dirs:
        if not folder.is_dir():
            raise LayoutError(f"{folder}: training folder (TRAIN_DIR) does not exist")
    sample = (
        _find_sample(data_dir, kind, sample_submission) if test is not None else None
    )  # no test set, nothing to submit
    extra, extra_labels = _find_extra(data_dir, extra_dir)
    return Layout(
        kind,
        data_dir,
        labels,
        dirs,
        test,
        sample,
        Path(patient_map) if patient_map else None,
        tuple(p for p in (test, extra) if p is not None),
        extra,
        extra_labels,
    )


def _override(data_dir: Path, value: str | Path | None, want_dir: bool, missing: str) -> tuple[bool, Path | None]:
    """A user's override: ``(False, None)`` when not given, ``(True, None)`` for ``none``, else
    ``(True, path)`` (relative to ``data_dir`` or absolute), which must exist (``missing`` says what it is)."""
    if value is None or not str(value).strip():
        return False, None
    if str(value).strip().lower() == NONE:
        return True, None
    path = _resolve(data_dir, value)
    if not (path.is_dir() if want_dir else path.is_file()):
        raise LayoutError(f"{path}: {missing}")
    return True, path


def _first_near(data_dir: Path, names: Sequence[str], want_dir: bool) -> Path | None:
    """The first of ``names`` found in ``data_dir`` or one folder below (names in order of preference)."""
    for name in names:
        hits = _near(data_dir, name, want_dir)
        if hits:
            return hits[0]
    return None


def _find_labels(data_dir: Path, train_csv: str | Path | None) -> tuple[Path, str]:
    given, path = _override(data_dir, train_csv, want_dir=False, missing="label CSV (TRAIN_CSV) not found")
    if given and path is None:
        raise LayoutError("TRAIN_CSV=none: a label CSV is needed (stage_2_train.csv or train-rle.csv)")
    path = path or _first_near(data_dir, (STAGE2_LABELS, STAGE1_LABELS), want_dir=False)
    if path is None:
        raise LayoutError(
            f"{data_dir}: no label CSV: expected {STAGE2_LABELS} (today's download) or {STAGE1_LABELS} (stage 1) "
            "in DATA_DIR or one folder below; or name it with TRAIN_CSV=<file>"
        )
    return path, {STAGE2_LABELS: "stage2", STAGE1_LABELS: "stage1"}.get(path.name, "custom")


def _find_test_dir(data_dir: Path, kind: str, test_dir: str | Path | None) -> Path | None:
    missing = "test folder (TEST_DIR) does not exist; TEST_DIR=none for a training-only run"
    given, path = _override(data_dir, test_dir, want_dir=True, missing=missing)
    if given:
        return path
    names = {"stage2": [STAGE2_TEST], "stage1": [STAGE1_TEST], "custom": [STAGE2_TEST, STAGE1_TEST]}[kind]
    path = _first_near(data_dir, names, want_dir=True)
    if path is None:
        raise LayoutError(
            f"{data_dir}: no test folder {names[0]}/ in DATA_DIR or one folder below; "
            "set TEST_DIR=<folder>, or TEST_DIR=none for a training-only run"
        )
    return path


def _find_sample(data_dir: Path, kind: str, sample: str | Path | None) -> Path | None:
    given, path = _override(data_dir, sample, want_dir=False, missing="sample submission (SAMPLE_SUBMISSION) not found")
    if given:
        return path
    return _first_near(data_dir, SAMPLE_NAMES if kind != "stage1" else SAMPLE_NAMES[1:], want_dir=False)


def _find_extra(data_dir: Path, extra_dir: str | Path | None) -> tuple[Path | None, Path | None]:
    """The extra training folder (``EXTRA_DIR``, else ``extra/`` or ``extra-positives/`` in ``data_dir`` or one
    folder below) and its label CSV (``labels.csv`` in it); ``(None, None)`` without one."""
    given, folder = _override(data_dir, extra_dir, want_dir=True, missing="extra folder (EXTRA_DIR) does not exist")
    if not given:
        folder = _first_near(data_dir, EXTRA_NAMES, want_dir=True)
    if folder is None:
        return None, None
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise LayoutError(
            f"{folder}: an extra training folder needs its labels.csv (ImageId,EncodedPixels rows, -1 for none); "
            "set EXTRA_DIR=none to leave it out"
        )
    return folder, labels


def walk_images(folders: Iterable[Path], skip: tuple[str, ...] = ()) -> list[Path]:
    """Every DICOM, PNG and JPEG file below ``folders`` (hidden files and folders, and folders named in
    ``skip``, left out), in path order."""
    found = []
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.lower() not in skip)
            found += [Path(root) / n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    return sorted(found, key=lambda p: p.parts)


def walk_dicoms(folders: Iterable[Path], exclude: Iterable[Path] = ()) -> list[Path]:
    """Every ``*.dcm`` below ``folders`` (hidden files and folders skipped), minus ``exclude``, in path order.

    ``os.walk``: about 2x faster than ``Path.rglob`` on the Kaggle layout, which nests every
    file two folders deep.
    """
    skip = {os.path.realpath(p) for p in exclude}
    found: list[str] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise LayoutError(f"{folder}: DICOM folder does not exist")
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(
                d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in skip
            )
            found.extend(os.path.join(root, n) for n in names if n.endswith(".dcm") and not n.startswith("."))
    return [Path(p) for p in sorted(dict.fromkeys(found), key=lambda p: p.split(os.sep))]


def index_dicoms(paths: Iterable[Path]) -> Found:
    """Image id (file stem) -> the first path in path order; later copies listed as duplicates."""
    found = Found({})
    for path in paths:
        image_id = path.stem
        kept = found.files.setdefault(image_id, path)
        if kept != path:
            found.duplicates.append(f"{image_id}: {kept} {path}")
            if kept.stat().st_size != path.stat().st_size:
                found.conflicting.append(f"{image_id}: {kept} ({kept.stat().st_size} bytes) {path}")
    found.files = dict(sorted(found.files.items()))
    return found


def _image_ids(path: Path) -> list[str]:
    """The ``ImageId`` column of a CSV, in file order (a byte-order mark and header spaces tolerated)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if "ImageId" not in header:
            raise LayoutError(f"{path}: header {header} lacks 'ImageId'")
        column = header.index("ImageId")
        return [row[column].strip() for row in reader if len(row) > column and row[column].strip()]


def read_sample_ids(path: Path) -> list[str]:
    """The image ids of a sample submission, once each, in file order."""
    ids = list(dict.fromkeys(_image_ids(path)))
    if not ids:
        raise LayoutError(f"{path}: sample submission lists no image")
    return ids


def label_ids(path: Path) -> set[str]:
    """The image ids of a label CSV, read fast (no RLE parsing): what the manifest needs."""
    return set(_image_ids(path))
