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
    from pneumothorax import rle

    return rle.read_label_rows(REAL_CSV)


@pytest.fixture(scope="session")
def real_labels(real_rows):
    from pneumothorax import rle

    return rle.group_labels(real_rows)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small synthetic world (300 train, 30 test images), shared by the session."""
    from pneumothorax import synthetic

    out = tmp_path_factory.mktemp("world")
    return synthetic.make_world(out, synthetic.WorldSpec(n_train=300, n_test=30, seed=11), workers=2, progress=False)


@pytest.fixture(scope="session")
def processed(world, tmp_path_factory) -> Path:
    """The world prepared at 32 and 64 pixels, with 2 folds."""
    from pneumothorax import files, folds, layout, prepare

    out = tmp_path_factory.mktemp("processed")
    found = layout.detect(world, patient_map=world / "kaggle-to-nih-id.csv")
    meta = prepare.prepare(found, out, sizes=(32, 64), workers=2, progress=False)
    train = meta[meta["split"] == "train"]
    files.write_csv(out / "folds.csv", folds.make_folds(train, n_folds=2, seed=0))
    return out
