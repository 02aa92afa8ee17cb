"""make prepare: metadata, caches, resumability and bad-input handling."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from pneumothorax import dicom, layout, prepare, rle, scale


def test_metadata_and_caches(world, processed):
    meta = pd.read_csv(processed / "metadata.csv", dtype={"image_id": str, "patient": str}, keep_default_na=False)
    assert list(meta.columns) == [
        "image_id",
        "split",
        "index",
        "path",
        "has_pneumothorax",
        "n_annotations",
        "mask_area",
        "sex",
        "age",
        "view",
        "patient",
        "error",
    ]
    assert (meta["split"] == "train").sum() == 300 and (meta["split"] == "test").sum() == 30
    labels = rle.read_labels(world / "train-rle.csv")
    train = meta[meta["split"] == "train"].set_index("image_id")
    for image_id, rows in list(labels.items())[:40]:
        assert train.loc[image_id, "has_pneumothorax"] == int(bool(rows))
        assert train.loc[image_id, "n_annotations"] == len(rows)
        assert train.loc[image_id, "mask_area"] == (rle.decode_union(rows).sum() if rows else 0)
    patients = pd.read_csv(world / "kaggle-to-nih-id.csv")
    assert train["patient"].nunique() < 300  # several images per patient, from the map
    assert set(train["patient"]) <= {n.split("_")[0] for n in patients["NIH_ID"]}
    images = prepare.load_cache(processed, "images", "train", 64)
    masks = prepare.load_cache(processed, "masks", "train", 64)
    assert images.shape == (300, 64, 64) and images.dtype == np.uint8 and masks.shape == (300, 64, 64)
    row = train[train["has_pneumothorax"] == 1].iloc[0]
    pixels, _ = dicom.read(row["path"])
    assert (images[row["index"]] == scale.downscale(pixels, 64)).all()
    direct = cv2.resize(pixels, (64, 64), interpolation=cv2.INTER_AREA)  # the halving chain rounds twice
    assert np.abs(images[row["index"]].astype(int) - direct).max() <= 1
    full = rle.decode_union(labels[row.name])
    expected = scale.downscale(full * np.uint8(255), 64) >= 128
    assert (masks[row["index"]].astype(bool) == expected).all()
    direct_mask = cv2.resize(full * np.uint8(255), (64, 64), interpolation=cv2.INTER_AREA) >= 128
    assert (masks[row["index"]].astype(bool) != direct_mask).sum() <= 0.02 * direct_mask.sum()
    assert prepare.load_cache(processed, "images", "test", 32).shape == (30, 32, 32)
    assert not list(processed.glob("*.tmp"))


def test_rerun_skips(world, processed):
    before = (processed / "metadata.csv").stat().st_mtime_ns
    found = layout.detect(world, patient_map=world / "kaggle-to-nih-id.csv")
    prepare.prepare(found, processed, sizes=(32,), workers=1, progress=False)
    assert (processed / "metadata.csv").stat().st_mtime_ns == before


def _small_copy(world, tmp_path, n_train=12):
    data = tmp_path / "data"
    labels = rle.read_label_rows(world / "train-rle.csv")
    keep = sorted({r.image_id for r in labels})[:n_train]
    train_files = {p.stem: p for p in (world / "dicom-images-train").rglob("*.dcm")}
    for image_id in keep:
        dst = data / "dicom-images-train" / f"{image_id}.dcm"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(train_files[image_id], dst)
    test_files = sorted((world / "dicom-images-test").rglob("*.dcm"))[:4]
    for path in test_files:
        dst = data / "dicom-images-test" / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst)
    rows = [r for r in labels if r.image_id in keep]
    text = "ImageId, EncodedPixels\n" + "".join(f"{r.image_id}, {r.rle}\n" for r in rows)
    (data / "train-rle.csv").write_text(text + "no-such-image, -1\n")
    return data, keep, test_files


def test_bad_training_file_fails_then_resumes_with_skip_bad(world, tmp_path):
    data, keep, _ = _small_copy(world, tmp_path)
    (data / "dicom-images-train" / f"{keep[3]}.dcm").write_bytes(b"broken")
    (data / "dicom-images-train" / f"{keep[5]}.dcm").write_bytes(b"also broken")
    out = tmp_path / "processed"
    found = layout.detect(data)
    with pytest.raises(prepare.PrepareError) as info:
        prepare.prepare(found, out, sizes=(32,), workers=1, progress=False)
    message = str(info.value)
    assert "2 unreadable training file(s)" in message and keep[3] in message and keep[5] in message
    # nothing that looks finished; the partial cache and its progress are kept for resuming
    assert not (out / "metadata.csv").exists() and not (out / "images_train_32.npy").exists()
    assert (out / "images_train_32.npy.tmp").exists() and (out / ".prepare-train.jsonl").exists()
    table = prepare.prepare(found, out, sizes=(32,), workers=1, skip_bad=True, progress=False)
    bad = table[table["error"] != ""]
    assert set(bad["image_id"]) == {keep[3], keep[5]}
    assert (out / "images_train_32.npy").exists() and not (out / "images_train_32.npy.tmp").exists()
    report = (out / "prepare-report.json").read_text()
    assert "no-such-image" in report  # a label row whose image is missing is reported


def test_bad_test_file_is_recorded(world, tmp_path):
    data, _, test_files = _small_copy(world, tmp_path)
    (data / "dicom-images-test" / test_files[1].name).write_bytes(b"broken")
    table = prepare.prepare(layout.detect(data), tmp_path / "p", sizes=(32,), workers=2, progress=False)
    test = table[table["split"] == "test"]
    assert len(test) == 4
    assert (test["error"] != "").sum() == 1 and test_files[1].stem in set(test.loc[test["error"] != "", "image_id"])


def test_missing_inputs(tmp_path):
    with pytest.raises(layout.LayoutError, match="no label CSV: expected stage_2_train.csv"):
        layout.detect(tmp_path)
    with pytest.raises(layout.LayoutError, match="DATA_DIR does not exist"):
        layout.detect(tmp_path / "nope")


def test_killed_run_resumes_where_it_stopped(world, tmp_path, monkeypatch):
    data, keep, _ = _small_copy(world, tmp_path)
    found = layout.detect(data)
    reference = prepare.prepare(found, tmp_path / "clean", sizes=(32, 64), workers=1, progress=False)
    out = tmp_path / "killed"
    real = prepare._process
    seen: list[int] = []

    def dies_after_five(task):
        if len(seen) == 5:
            raise KeyboardInterrupt  # the user's Ctrl-C, in the middle of the train split
        seen.append(task[0])
        return real(task)

    monkeypatch.setattr(prepare, "_process", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(found, out, sizes=(32, 64), workers=1, progress=False)
    log = (out / ".prepare-train.jsonl").read_text().splitlines()
    assert len(log) == 1 + 5 and not (out / "metadata.csv").exists()
    with open(out / ".prepare-train.jsonl", "a") as fh:
        fh.write('{"index": 7, "sex": "M", "ag')  # a line cut short by the kill is not trusted

    redone: list[int] = []
    monkeypatch.setattr(prepare, "_process", lambda task: redone.append(task[0]) or real(task))
    table = prepare.prepare(found, out, sizes=(32, 64), workers=1, progress=False)
    train_redone, test_done = redone[: len(keep) - 5], redone[len(keep) - 5 :]  # the train split comes first
    assert sorted(train_redone) == sorted(set(range(len(keep))) - set(seen))  # only what was not finished
    assert sorted(test_done) == [0, 1, 2, 3]
    assert not list(out.glob(".prepare-*")) and not list(out.glob("*.tmp"))
    for kind, split, size in (("images", "train", 64), ("masks", "train", 32), ("images", "test", 32)):
        again = prepare.load_cache(out, kind, split, size)
        assert (again == prepare.load_cache(tmp_path / "clean", kind, split, size)).all()
    columns = ["image_id", "split", "index", "has_pneumothorax", "mask_area", "sex", "age", "view", "error"]
    pd.testing.assert_frame_equal(table[columns], reference[columns])


def test_dicoms_found_in_nested_folders_skipping_hidden_files(tmp_path):
    for rel in ("1.2.3/1.2.4/b.dcm", "1.2.5/1.2.6/a.dcm", "x/._a.dcm", "z/b.dcm", "notes.txt", ".trash/c.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = layout.index_dicoms(layout.walk_dicoms([tmp_path]))
    assert list(found.files) == ["a", "b"]  # macOS "._" files and hidden folders are not images
    assert found.files["b"] == tmp_path / "1.2.3/1.2.4/b.dcm"  # the first in path order wins
    assert found.duplicates == [f"b: {tmp_path / '1.2.3/1.2.4/b.dcm'} {tmp_path / 'z/b.dcm'}"]
    assert found.conflicting == []  # same size
    with pytest.raises(layout.LayoutError, match="does not exist"):
        layout.walk_dicoms([tmp_path / "missing"])
