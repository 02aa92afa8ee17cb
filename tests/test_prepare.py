"""make prepare: metadata, caches, resumability and bad-input handling."""

from __future__ import annotations

import os
import shutil
import signal
import threading

import cv2
import numpy as np
import pandas as pd
import pytest

from pneumothorax.data import prepare, prepared
from pneumothorax.io import atomic, dicom, layout, resize, rle


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
    images = prepared.load_cache(processed, "images", "train", 64)
    masks = prepared.load_cache(processed, "masks", "train", 64)
    assert images.shape == (300, 64, 64) and images.dtype == np.uint8 and masks.shape == (300, 64, 64)
    row = train[train["has_pneumothorax"] == 1].iloc[0]
    pixels, _ = dicom.read(row["path"])
    assert (images[row["index"]] == resize.downscale(pixels, 64)).all()
    direct = cv2.resize(pixels, (64, 64), interpolation=cv2.INTER_AREA)  # the halving chain rounds twice
    assert np.abs(images[row["index"]].astype(int) - direct).max() <= 1
    full = rle.decode_union(labels[row.name])
    expected = resize.downscale(full * np.uint8(255), 64) >= 128
    assert (masks[row["index"]].astype(bool) == expected).all()
    direct_mask = cv2.resize(full * np.uint8(255), (64, 64), interpolation=cv2.INTER_AREA) >= 128
    assert (masks[row["index"]].astype(bool) != direct_mask).sum() <= 0.02 * direct_mask.sum()
    assert prepared.load_cache(processed, "images", "test", 32).shape == (30, 32, 32)
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
        again = prepared.load_cache(out, kind, split, size)
        assert (again == prepared.load_cache(tmp_path / "clean", kind, split, size)).all()
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


def _decoded(monkeypatch) -> list[tuple[int, tuple[int, ...]]]:
    """Record (index, sizes decoded) of every task prepare runs in this process."""
    seen: list[tuple[int, tuple[int, ...]]] = []
    real = prepare._process

    def spy(task):
        seen.append((task.index, tuple(t.size for t in task.decode)))
        return real(task)

    monkeypatch.setattr(prepare, "_process", spy)
    return seen


def test_reruns_redo_exactly_what_changed(world, tmp_path, monkeypatch):
    data, keep, test_files = _small_copy(world, tmp_path)
    out = tmp_path / "processed"
    first = prepare.prepare(layout.detect(data), out, sizes=(32, 64), workers=1, progress=False)
    before = {k: np.load(out / f"{k}_train_32.npy").copy() for k in ("images", "masks")}
    seen = _decoded(monkeypatch)
    prepare.prepare(layout.detect(data), out, sizes=(32, 64), workers=1, progress=False)
    assert seen == []  # nothing changed: nothing decoded, nothing copied
    # a DICOM replaced by another image: only it is decoded again, in place, at both sizes
    train = first[first["split"] == "train"].set_index("image_id")
    a, b = keep[2], keep[6]
    shutil.copy(data / "dicom-images-train" / f"{b}.dcm", data / "dicom-images-train" / f"{a}.dcm")
    prepare.prepare(layout.detect(data), out, sizes=(32, 64), workers=1, progress=False)
    assert seen == [(train.loc[a, "index"], (32, 64))]
    images = np.load(out / "images_train_32.npy")
    assert (images[train.loc[a, "index"]] == images[train.loc[b, "index"]]).all()
    others = np.delete(np.arange(len(images)), train.loc[a, "index"])
    assert (images[others] == before["images"][others]).all()
    # a label edited (a positive made negative): its mask row is cleared, its metadata follows
    positive = train[train["has_pneumothorax"] == 1].index[0]
    csv = data / "train-rle.csv"
    text = "".join(line if not line.startswith(positive) else "" for line in csv.read_text().splitlines(keepends=True))
    csv.write_text(text + f"{positive}, -1\n")
    seen.clear()
    table = prepare.prepare(layout.detect(data), out, sizes=(32, 64), workers=1, progress=False)
    assert seen == [(train.loc[positive, "index"], (32, 64))]
    row = table.set_index("image_id").loc[positive]
    assert row["has_pneumothorax"] == 0 and row["mask_area"] == 0
    assert not np.load(out / "masks_train_64.npy")[row["index"]].any() and before["masks"][row["index"]].any()
    # a new test folder: the test split is redone (rows copied where the image is the same), train untouched
    shutil.copy(data / "dicom-images-train" / f"{keep[0]}.dcm", data / "dicom-images-test" / "extra.dcm")
    seen.clear()
    table = prepare.prepare(layout.detect(data), out, sizes=(32, 64), workers=1, progress=False)
    assert [i for i, sizes in seen if sizes] == [int(table.set_index("image_id").loc["extra", "index"])]
    assert np.load(out / "images_test_32.npy").shape == (5, 32, 32)
    assert not list(out.glob("*.tmp"))


def test_a_repaired_file_is_read_again(world, tmp_path, monkeypatch):
    data, keep, _ = _small_copy(world, tmp_path)
    broken = data / "dicom-images-train" / f"{keep[4]}.dcm"
    good = broken.read_bytes()
    broken.write_bytes(b"broken")
    out = tmp_path / "processed"
    table = prepare.prepare(layout.detect(data), out, sizes=(32,), workers=1, skip_bad=True, progress=False)
    assert table.set_index("image_id").loc[keep[4], "error"] != ""
    broken.write_bytes(good)  # the user replaces the file
    seen = _decoded(monkeypatch)
    table = prepare.prepare(layout.detect(data), out, sizes=(32,), workers=1, progress=False)
    assert seen == [(int(table.set_index("image_id").loc[keep[4], "index"]), (32,))]
    assert (table["error"] == "").all()


def test_a_killed_worker_fails_the_step_and_the_rerun_resumes(world, tmp_path, monkeypatch):
    data, keep, _ = _small_copy(world, tmp_path)
    real = prepare._process
    victim = data / "dicom-images-train" / f"{keep[7]}.dcm"

    def oom_killed(task):
        if task.path == str(victim):
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
        return real(task)

    monkeypatch.setattr(prepare, "_process", oom_killed)
    out = tmp_path / "processed"
    with pytest.raises(prepare.PrepareError, match="a prepare worker died"):
        prepare.prepare(layout.detect(data), out, sizes=(32,), workers=2, progress=False)
    monkeypatch.setattr(prepare, "_process", real)
    table = prepare.prepare(layout.detect(data), out, sizes=(32,), workers=2, progress=False)
    assert (table["error"] == "").all() and len(table) == len(keep) + 4


def test_a_second_prepare_waits_for_the_first(world, tmp_path, capfd):
    data, keep, _ = _small_copy(world, tmp_path)
    out = tmp_path / "processed"
    finished = []
    with atomic.locked(out / ".prepare.lock", "test"):
        worker = threading.Thread(
            target=lambda: finished.append(
                prepare.prepare(layout.detect(data), out, sizes=(32,), workers=1, progress=False)
            )
        )
        worker.start()
        worker.join(timeout=3)
        assert worker.is_alive() and not finished  # waiting on the lock
    worker.join(timeout=120)
    assert len(finished) == 1 and len(finished[0]) == len(keep) + 4
    assert "is in use by pid" in capfd.readouterr().err
