"""Shared fixtures: the real files in tests/fixtures and one small synthetic world per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing weight fails in a second, not a minute

FIXTURES = Path(__file__).parent / "fixtures"
REAL_CSV = FIXTURES / "train-rle.csv.gz"
DCM_301 = FIXTURES / "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319.dcm"
DCM_6904 = FIXTURES / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DCM_MONO1 = FIXTURES / "monochrome1-edit.dcm"


@pytest.fixture(scope="session")
def real_rows():
    from pneumothorax.io import rle

    return rle.read_label_rows(REAL_CSV)


@pytest.fixture(scope="session")
def real_labels(real_rows):
    from pneumothorax.io import rle

    return rle.group_labels(real_rows)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small synthetic world (300 train, 30 test images), shared by the session."""
    from pneumothorax.data import synthetic

    out = tmp_path_factory.mktemp("world")
    return synthetic.make_world(out, synthetic.WorldSpec(n_train=300, n_test=30, seed=11), workers=2, progress=False)


def _prepare_world(world: Path, out: Path, sizes: tuple[int, ...]):
    """A synthetic world prepared into ``out`` at ``sizes``: its metadata table."""
    from pneumothorax.data import prepare
    from pneumothorax.io import layout

    found = layout.detect(world, patient_map=world / "kaggle-to-nih-id.csv")
    return prepare.prepare(found, out, sizes=sizes, workers=2, progress=False)


@pytest.fixture()
def prepare_world():
    """Prepare a synthetic world: ``(world, out, sizes) -> metadata``."""
    return _prepare_world


@pytest.fixture(scope="session")
def processed(world, tmp_path_factory) -> Path:
    """The world prepared at 32 and 64 pixels, with 2 folds."""
    from pneumothorax.data import splitting
    from pneumothorax.io import atomic

    out = tmp_path_factory.mktemp("processed")
    meta = _prepare_world(world, out, (32, 64))
    train = meta[meta["split"] == "train"]
    atomic.write_csv(out / "folds.csv", splitting.make_folds(train, n_folds=2, seed=0))
    return out


@pytest.fixture()
def exp(processed, tmp_path):
    """A fresh experiment folder (models/<exp>) holding the 2-fold split of :func:`processed`."""
    import shutil

    from pneumothorax.io.paths import ExperimentDir

    out = ExperimentDir(tmp_path / "models" / "tiny", 64)
    out.root.mkdir(parents=True)
    shutil.copy(processed / "folds.csv", out.folds)
    return out


def _finished_folds(cfg, exp, processed, maps_of, size=64):
    """Fake finished segmentation folds whose OOF maps are ``maps_of(masks)``, recorded on the current split."""
    import json

    import numpy as np
    import pandas as pd

    from pneumothorax.data import folds, prepared
    from pneumothorax.train import checkpoints

    split = pd.read_csv(exp.folds, dtype={"image_id": str})
    rows = pd.read_csv(processed / "metadata.csv", dtype={"image_id": str}, keep_default_na=False)
    rows = rows[rows["split"] == "train"].merge(split[["image_id", "fold"]], on="image_id")
    masks = prepared.load_cache(processed, "masks", "train", size)
    exp.oof.mkdir(parents=True, exist_ok=True)
    for k in range(cfg.data.n_folds):
        run = exp.segmenter(k)
        run.root.mkdir(parents=True)
        part = rows[rows["fold"] == k]
        np.save(exp.oof_maps(k), maps_of(np.asarray(masks[part["index"].to_numpy()])))
        part[["image_id", "index", "has_pneumothorax"]].to_csv(exp.oof_ids(k), index=False)
        meta = {"section": {"split": folds.split_hash(split, k)}}
        checkpoints.save_checkpoint(run.model, {"state_dict": {}, "meta": meta})
        run.trained_under.write_text(json.dumps(meta["section"]))  # what the search checks the split against


@pytest.fixture()
def finished_folds():
    """Make fake finished segmentation folds of an experiment: ``(cfg, exp, processed, maps_of, size=64)``."""
    return _finished_folds


def to_stage2(source: Path, dest_dir: Path, image_id: str) -> Path:
    """A copy of a real DICOM as today's test files are: named ``ID_<9 hex>.dcm``, SOPInstanceUID
    that same string (not a UID), PatientID and study/series UIDs empty."""
    import pydicom

    from pneumothorax.io import dicom

    with dicom.lenient():
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = image_id
        ds.file_meta.MediaStorageSOPInstanceUID = image_id
        ds.PatientID = ""
        ds.StudyInstanceUID = ""
        ds.SeriesInstanceUID = ""
        dest_dir.mkdir(parents=True, exist_ok=True)
        path = dest_dir / f"{image_id}.dcm"
        ds.save_as(path)
    return path


REAL_TEST_IDS = ("ID_0011fe81e", "ID_00a0f8b1c")


@pytest.fixture(scope="session")
def today_template(tmp_path_factory) -> Path:
    """A miniature of today's download: stage_2_train.csv, stage_2_images/ (synthetic test images and
    two real DICOMs in stage-2 form), the sample submission, and the training DICOMs of a stage-1
    re-upload nested under siim/, with a second copy of part of it under pneumothorax/."""
    import shutil

    from pneumothorax.data import synthetic

    out = tmp_path_factory.mktemp("today") / "siim-acr"
    synthetic.make_world(
        out, synthetic.WorldSpec(n_train=60, n_test=6, seed=4, layout="stage2"), workers=2, progress=False
    )
    for image_id, source in zip(REAL_TEST_IDS, (DCM_301, DCM_6904), strict=True):
        to_stage2(source, out / "stage_2_images", image_id)
    sample = out / "stage_2_sample_submission.csv"
    sample.write_text(sample.read_text() + "".join(f"{i},-1\n" for i in REAL_TEST_IDS))
    copies = sorted((out / "siim" / "dicom-images-train").iterdir())[:5]
    for study in copies:
        shutil.copytree(study, out / "pneumothorax" / "dicom-images-train" / study.name)
    (out / "world.json").unlink()  # a user's download has no synthetic stamp
    return out


@pytest.fixture()
def today(today_template, tmp_path) -> Path:
    """A private copy of :func:`today_template` that a test may change."""
    import shutil

    return Path(shutil.copytree(today_template, tmp_path / "siim-acr"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that neither trains nor runs make is a unit test (``make test-fast`` runs those)."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("trains", "make")):
            item.add_marker(pytest.mark.unit)
