"""The synthetic world is in the exact stage-1 layout and readable by the real readers."""

from __future__ import annotations

import numpy as np
import pydicom

from pneumothorax import dicom, rle, synthetic


def test_layout_and_labels(world):
    train = sorted((world / "dicom-images-train").rglob("*.dcm"))
    test = sorted((world / "dicom-images-test").rglob("*.dcm"))
    assert len(train) == 300 and len(test) == 30
    assert all(len(p.relative_to(world / "dicom-images-train").parts) == 3 for p in train)
    header = (world / "train-rle.csv").read_text().splitlines()[0]
    assert header == "ImageId, EncodedPixels"  # the real file's leading space
    labels = rle.read_labels(world / "train-rle.csv")
    assert set(labels) == {p.stem for p in train}
    positive = sum(1 for v in labels.values() if v)
    assert 0.12 < positive / len(labels) < 0.32
    assert any(len(v) > 1 for v in labels.values())  # several rows for some images
    assert set(rle.read_labels(world / "test-labels.csv")) == {p.stem for p in test}


def test_dicoms_are_jpeg_baseline_and_masks_are_air(world):
    labels = rle.read_labels(world / "train-rle.csv")
    path = next(p for p in (world / "dicom-images-train").rglob("*.dcm") if labels[p.stem])
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and (ds.Rows, ds.Columns) == (1024, 1024)
    assert ds.SOPInstanceUID == path.stem and ds.ViewPosition in ("PA", "AP")
    pixels, meta = dicom.read(path)
    mask = rle.decode_union(labels[path.stem]).astype(bool)
    ring = (np.roll(mask, 40, axis=1) | np.roll(mask, -40, axis=1)) & ~mask
    assert pixels[mask].mean() < pixels[ring].mean()  # pneumothorax is darker than around it
    assert meta["age"] is not None


def test_seeded(tmp_path):
    spec = synthetic.WorldSpec(n_train=3, n_test=1, seed=5)
    a = synthetic.make_world(tmp_path / "a", spec, workers=1, progress=False)
    b = synthetic.make_world(tmp_path / "b", spec, workers=1, progress=False)
    assert (a / "train-rle.csv").read_text() == (b / "train-rle.csv").read_text()
    pa = sorted(a.rglob("*.dcm"))[0]
    pb = sorted(b.rglob("*.dcm"))[0]
    assert (dicom.read(pa)[0] == dicom.read(pb)[0]).all()
