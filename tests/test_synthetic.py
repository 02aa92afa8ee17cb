"""The synthetic world is in the exact stage-1 layout and readable by the real readers."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from pneumothorax.data import synthetic
from pneumothorax.io import dicom, rle


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


def test_a_hard_world_has_smaller_fainter_noisier_pneumothoraces(tmp_path):
    easy = synthetic.WorldSpec(n_train=24, n_test=0, seed=3, positive_rate=0.6)
    hard = synthetic.WorldSpec(**{**easy.__dict__, **synthetic.DIFFICULTIES["hard"]})
    worlds = {
        name: synthetic.make_world(tmp_path / name, spec, workers=2, progress=False)
        for name, spec in (("easy", easy), ("hard", hard))
    }
    labels = {name: rle.read_labels(w / "train-rle.csv") for name, w in worlds.items()}
    assert [bool(v) for v in labels["easy"].values()] == [bool(v) for v in labels["hard"].values()]  # same images
    area = {n: np.array([rle.decode_union(v).sum() for v in labels[n].values() if v]) for n in labels}
    np.testing.assert_allclose(area["hard"] / area["easy"], 0.7**2, rtol=0.15)  # lesion_scale 0.7, linear
    contrast, noise = {}, {}
    for name, world in worlds.items():
        gaps, grains = [], []
        for path in sorted((world / "dicom-images-train").rglob("*.dcm")):
            rows = labels[name][path.stem]
            pixels = dicom.read(path)[0].astype(float)
            grains.append(np.std(pixels[8:40, 8:40] - np.mean(pixels[8:40, 8:40])))  # outside the body: noise only
            if rows:
                mask = rle.decode_union(rows).astype(bool)
                ring = (np.roll(mask, 40, axis=1) | np.roll(mask, -40, axis=1)) & ~mask
                gaps.append(pixels[ring].mean() - pixels[mask].mean())
        contrast[name], noise[name] = np.mean(gaps), np.mean(grains)
    assert contrast["hard"] < 0.8 * contrast["easy"] and noise["hard"] > 1.8 * noise["easy"]
    with pytest.raises(ValueError, match=r"holds another synthetic world \(it differs in \['contrast'"):
        synthetic.make_world(worlds["easy"], synthetic.WorldSpec(**{**easy.__dict__, "contrast": 0.5}), progress=False)


def test_the_real_preset_has_the_real_images_grey_levels_and_rows_per_image(tmp_path):
    spec = synthetic.WorldSpec(n_train=24, n_test=0, seed=3, positive_rate=0.5, **synthetic.DIFFICULTIES["real"])
    world = synthetic.make_world(tmp_path / "w", spec, workers=2, progress=False)
    pixels = np.stack([dicom.read(p)[0] for p in sorted(world.rglob("*.dcm"))])
    levels = np.percentile(pixels, [5, 25, 50, 75, 95])
    real = np.array(synthetic.REAL_QUANTILES)[[1, 5, 10, 15, 19]]  # the same percentiles of the real DICOMs
    assert np.abs(levels - real).max() <= 3, (levels, real)
    default = synthetic.render(np.random.default_rng(0), 1, None)
    assert np.percentile(default, 50) < real[2] - 10  # the default world is darker: what the preset corrects
    matched = synthetic.match_histogram(default)
    order = default.ravel().argsort()
    assert (np.diff(matched.ravel()[order].astype(int)) >= 0).all()  # monotone: the drawing's order of grey kept
    labels = rle.read_labels(world / "train-rle.csv")
    rows = [len(r) for r in labels.values() if r]
    assert np.mean(rows) < 1.4  # no extra row stacked: the real shape sets' 1.31 rows per image
