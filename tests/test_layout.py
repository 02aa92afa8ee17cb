"""Today's Kaggle download and the stage-1 layout, found from DATA_DIR alone; what a user gets wrong."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from pneumothorax.data import prepare, prepared
from pneumothorax.io import dicom, layout, manifest, resize, rle

from .conftest import DCM_301, REAL_TEST_IDS, to_stage2


def test_stage2_files_read_like_the_originals_without_warnings(tmp_path, capfd):
    copy = to_stage2(DCM_301, tmp_path, "ID_0011fe81e")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom would warn once per file about the non-UID name
        pixels, meta = dicom.read(copy)
    original, original_meta = dicom.read(DCM_301)
    assert (pixels == original).all()
    assert meta["sop_instance_uid"] == "ID_0011fe81e" and meta["sop_is_uid"] is False
    assert original_meta["sop_is_uid"] is True and meta["patient_id"] == ""
    assert capfd.readouterr().err == ""


def test_todays_layout_is_found_from_data_dir_alone(today_template):
    found = layout.detect(today_template)
    assert found.kind == "stage2"
    assert found.labels == today_template / "stage_2_train.csv"
    assert found.test_dir == today_template / "stage_2_images"
    assert found.sample_submission == today_template / "stage_2_sample_submission.csv"
    inputs = prepare.scan(found)
    labels = rle.read_labels(today_template / "stage_2_train.csv")
    # every labelled DICOM is training data: both re-uploaded stage-1 folders, nested under siim/
    assert set(inputs.train) == set(labels) and len(inputs.train) == 60
    in_test_folder = {p.stem for p in (today_template / "siim" / "dicom-images-test").rglob("*.dcm")}
    assert in_test_folder and in_test_folder <= set(inputs.train)
    # the second copy under pneumothorax/ is recognised as the same images, not counted twice
    copies = list((today_template / "pneumothorax").rglob("*.dcm"))
    assert len(inputs.report.duplicate_files) == len(copies) == 5
    assert all(inputs.train[p.stem] == p for p in copies)  # pneumothorax/ comes first in path order
    assert all(f"{p.stem}: {p} {today_template / 'siim'}" in "\n".join(inputs.report.duplicate_files) for p in copies)
    sample = pd.read_csv(today_template / "stage_2_sample_submission.csv")
    assert sorted(inputs.test) == sorted(sample["ImageId"]) and set(REAL_TEST_IDS) <= set(inputs.test)
    assert inputs.report.labels_without_image == [] and inputs.report.unlabelled_images == []


def test_stage1_layout(world):
    found = layout.detect(world)
    assert found.kind == "stage1" and found.test_dir == world / "dicom-images-test"
    assert found.sample_submission is None
    assert len(prepare.scan(found).test) == 30


def test_overrides_and_training_only(today):
    found = layout.detect(
        today, train_csv="stage_2_train.csv", train_dirs=["siim/dicom-images-train", "siim/dicom-images-test"]
    )
    assert found.train_dirs == (today / "siim/dicom-images-train", today / "siim/dicom-images-test")
    assert len(prepare.scan(found).train) == 60
    alone = layout.detect(today, test_dir="none")
    assert alone.test_dir is None and prepare.scan(alone).test == {}
    with pytest.raises(layout.LayoutError, match="stage_2_imgs: test folder \\(TEST_DIR\\) does not exist"):
        layout.detect(today, test_dir="stage_2_imgs")
    with pytest.raises(layout.LayoutError, match="TRAIN_CSV"):
        layout.detect(today, train_csv="stage2_train.csv")
    (today / "empty").mkdir()
    with pytest.raises(prepare.PrepareError, match="empty: the test folder holds no DICOM file"):
        prepare.scan(layout.detect(today, test_dir="empty", sample_submission="none"))
    shutil.rmtree(today / "stage_2_images")
    with pytest.raises(layout.LayoutError, match="no test folder stage_2_images/.*TEST_DIR=none"):
        layout.detect(today)


def test_sample_submission_must_match_the_test_folder(today):
    victim = today / "stage_2_images" / f"{REAL_TEST_IDS[1]}.dcm"
    victim.rename(today / "elsewhere.dcm")
    with pytest.raises(
        prepare.PrepareError, match=f"1 image\\(s\\) of the sample submission have no test DICOM.*{REAL_TEST_IDS[1]}"
    ):
        prepare.scan(layout.detect(today))
    (today / "elsewhere.dcm").rename(victim)
    to_stage2(DCM_301, today / "stage_2_images", "ID_fffffffff")
    with pytest.raises(
        prepare.PrepareError, match="1 test DICOM\\(s\\) are not in the sample submission.*ID_fffffffff"
    ):
        prepare.scan(layout.detect(today))


def test_label_csv_with_a_byte_order_mark(today):
    labels = today / "stage_2_train.csv"
    labels.write_bytes(
        b"\xef\xbb\xbf" + labels.read_bytes().replace(b"ImageId,EncodedPixels", b"ImageId, EncodedPixels")
    )
    rows = rle.read_label_rows(labels)
    assert len({r.image_id for r in rows}) == 60


def test_prepare_on_todays_layout_summarises_the_stage2_names(today, tmp_path):
    out = tmp_path / "processed"
    table = prepare.prepare(layout.detect(today), out, sizes=(32,), workers=2, progress=False)
    assert (table["split"] == "train").sum() == 60 and (table["split"] == "test").sum() == 8
    summary = prepared.summarize(out / "prepare-report.json")
    assert "8 files have a non-UID SOPInstanceUID (stage-2 names like ID_0011fe81e): fine" in summary
    assert "5 extra copies of an image" in summary
    ids, sample = prepared.expected_test_ids(out)
    assert sample == today / "stage_2_sample_submission.csv" and ids[-2:] == list(REAL_TEST_IDS)
    real = table.set_index("image_id").loc[REAL_TEST_IDS[0]]
    images = np.load(out / "images_test_32.npy")
    pixels, _ = dicom.read(DCM_301)
    assert (images[real["index"]] == resize.downscale(pixels, 32)).all()


def test_manifest_changes_only_with_the_inputs(today, tmp_path):
    found = layout.detect(today)
    assert manifest.update(found, tmp_path) == {"train": True, "test": True}
    assert manifest.update(found, tmp_path) == {"train": False, "test": False}
    to_stage2(DCM_301, today / "stage_2_images", "ID_fffffffff")
    assert manifest.update(layout.detect(today), tmp_path) == {"train": False, "test": True}
    labels = today / "stage_2_train.csv"
    labels.write_text(labels.read_text().replace(",-1\n", ", -1\n", 1))  # one label row edited
    assert manifest.update(layout.detect(today), tmp_path) == {"train": True, "test": False}


def test_one_folder_spelt_relative_or_absolute_is_the_same_inputs(today, tmp_path, monkeypatch):
    # `make ... DATA_DIR=data/raw/x` after a run with DATA_DIR=/abs/data/raw/x must not re-prepare and re-infer
    records = tmp_path / "records"
    assert manifest.update(layout.detect(today), records) == {"train": True, "test": True}
    monkeypatch.chdir(today.parent)
    relative = layout.detect(today.name)
    assert relative.test_dir == today / "stage_2_images" and relative.data_dir.is_absolute()
    assert manifest.update(relative, records) == {"train": False, "test": False}
