"""A synthetic SIIM-ACR world: procedurally drawn chest X-rays in today's layout or the stage-1 layout.

Pneumothorax shapes are real SIIM masks (``data/external/real-masks-rle.csv.gz``), some
images get several (overlapping) label rows, and the collapsed region is rendered as air:
darker, without lung texture, edged by a bright pleural line. Ribs, heart, spine, tubes and
skin folds (thin curved lines like a pleural edge) are distractors; noise, gamma and
contrast vary per image. Everything is seeded: the same seed writes the same world.

Layout ``stage1`` written under ``out_dir``::

    dicom-images-train/<study>/<series>/<image_id>.dcm   JPEG-baseline 1024x1024 DICOMs
    dicom-images-test/<study>/<series>/<image_id>.dcm
    train-rle.csv        header 'ImageId, EncodedPixels' (leading space, as the real file)
    test-labels.csv      the test truth, same format, for scoring
    kaggle-to-nih-id.csv Kaggle_ID,NIH_ID: several images per synthetic patient

Layout ``stage2`` (today's download plus a stage-1 re-upload) written under ``out_dir``::

    siim/dicom-images-train/<study>/<series>/<image_id>.dcm  training images (stage-1 train)
    siim/dicom-images-test/<study>/<series>/<image_id>.dcm   training images (stage-1 test: one row each)
    stage_2_train.csv                 header 'ImageId,EncodedPixels', labels of both folders
    stage_2_images/ID_<9 hex>.dcm     the test set: SOPInstanceUID 'ID_...', PatientID and study/series UIDs empty
    stage_2_sample_submission.csv     every test id, '-1'
    test-labels.csv, kaggle-to-nih-id.csv   as above (the map covers training images only, as the real one)
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from pneumothorax.io import atomic, dicom, paths, processes, progress_bars, rle

SIZE = 1024
LOW = 256
UID_ROOT = "1.2.276.0.7230010.3.1.4.8323329"


@dataclass(frozen=True)
class WorldSpec:
    """What a synthetic world holds."""

    n_train: int = 240
    n_test: int = 60
    seed: int = 0
    positive_rate: float = 0.22
    multi_row_rate: float = 0.25
    images_per_patient: float = 2.0
    layout: str = "stage1"  # stage1, or stage2 (today's download with a stage-1 re-upload)
    stage1_test_share: float = 0.15  # stage2: share of training images in the re-uploaded dicom-images-test/
    # Difficulty (1.0 = the default world): noise amplitude, the contrast of the collapsed region
    # (air darkness and pleural line) against the lung, and the linear size of each pneumothorax.
    noise: float = 1.0
    contrast: float = 1.0
    lesion_scale: float = 1.0
    # Realism: each image's grey levels mapped onto the real SIIM images' distribution (REAL_QUANTILES).
    real_histogram: bool = False


DIFFICULTIES = {
    "default": {"noise": 1.0, "contrast": 1.0, "lesion_scale": 1.0},
    "hard": {"noise": 2.5, "contrast": 0.6, "lesion_scale": 0.7},
    "harder": {"noise": 3.5, "contrast": 0.45, "lesion_scale": 0.6},
    # Moved towards the real images where they differ (docs/results.md): their grey-level distribution, and
    # their rows per image (the real shape sets already hold the real multi-row images: no extra row stacked).
    "real": {"noise": 1.0, "contrast": 1.0, "lesion_scale": 1.0, "real_histogram": True, "multi_row_rate": 0.0},
}
"""Named settings of the knobs (``make synthetic SYNTH_DIFFICULTY=hard``)."""

REAL_QUANTILES = (0, 5, 25, 50, 67, 81, 93, 103, 113, 122, 130, 139, 147, 156, 166, 175, 185, 196, 207, 220, 255)
"""Percentiles 0, 5, ..., 100 of the grey levels of the 1,012 real SIIM DICOMs of ../shared/data/siim-real-dev,
as prepared (128 px). The default world is darker (median 107 against 130) with a darker background."""


def match_histogram(pixels: np.ndarray, quantiles: tuple[int, ...] = REAL_QUANTILES) -> np.ndarray:
    """``pixels`` mapped monotonically so that their percentiles are ``quantiles`` (evenly spaced percentiles)."""
    levels = np.linspace(0, 100, len(quantiles))
    own = np.percentile(pixels, levels)
    own = own + np.arange(len(own)) * 1e-3  # strictly increasing where the image is flat
    return np.clip(np.rint(np.interp(pixels, own, quantiles)), 0, 255).astype(np.uint8)


LAYOUTS = ("stage1", "stage2")


def load_shapes(path: Path = paths.REAL_MASKS) -> list[list[str]]:
    """Real pneumothorax shapes: per real image, its list of RLE rows."""
    grouped = rle.read_labels(path)
    return [rows for rows in grouped.values() if rows]


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ay: float, ax: float) -> np.ndarray:
    return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = rng.standard_normal((size, size)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def _curve(rng: np.random.Generator, box: tuple[int, int, int, int], n: int = 5) -> np.ndarray:
    """A smooth random polyline inside ``box`` (y0, x0, y1, x1), in 1024 coordinates."""
    y0, x0, y1, x1 = box
    ys = np.sort(rng.uniform(y0, y1, n))
    xs = np.cumsum(rng.normal(0, (x1 - x0) / 8, n)) + rng.uniform(x0, x1)
    t = np.linspace(0, 1, 40)
    yi = np.interp(t, np.linspace(0, 1, n), ys)
    xi = np.interp(t, np.linspace(0, 1, n), np.clip(xs, x0, x1))
    return np.stack([xi, yi], axis=1).astype(np.int32)


def render(
    rng: np.random.Generator, anatomy_seed: int, mask: np.ndarray | None, noise: float = 1.0, contrast: float = 1.0
) -> np.ndarray:
    """Draw one 1024x1024 uint8 chest radiograph, with the pneumothorax ``mask`` as air (``contrast`` scales
    how much it differs from lung; ``noise`` the acquisition noise)."""
    arng = np.random.default_rng(anatomy_seed)  # one patient's anatomy, shared by their images
    yy, xx = np.mgrid[0:LOW, 0:LOW].astype(np.float32)
    dx, dy = arng.normal(0, 4), arng.normal(0, 4)
    img = np.full((LOW, LOW), 0.08, np.float32)
    body = _ellipse(yy, xx, 150 + dy, 128 + dx, 150, 118 + arng.normal(0, 5))
    img[body] = 0.55
    lungs = np.zeros((LOW, LOW), bool)
    for side in (-1, 1):
        cx = 128 + dx + side * (48 + arng.normal(0, 3))
        lungs |= _ellipse(yy, xx, 118 + dy, cx, 88 + arng.normal(0, 4), 40 + arng.normal(0, 3))
    lungs &= np.abs(xx - 128 - dx) > 10
    img[lungs] = 0.26
    base = cv2.GaussianBlur(img, (0, 0), 3)
    # Vessel texture inside the lungs: brighter towards the hila.
    hilum = np.exp(-(((xx - 128 - dx) / 60) ** 2 + ((yy - 125 - dy) / 70) ** 2))
    texture = np.clip(_smooth_noise(rng, LOW, 1.2), 0, None) * (0.05 + 0.07 * hilum)
    full = base + texture * cv2.GaussianBlur(lungs.astype(np.float32), (0, 0), 2)
    # Heart, spine and ribs are in both the textured and the air rendering.
    anatomy = np.zeros((LOW, LOW), np.float32)
    anatomy[_ellipse(yy, xx, 168 + dy, 140 + dx, 42, 46 + arng.normal(0, 4))] = 0.32
    anatomy[(np.abs(xx - 128 - dx) < 9) & body] = 0.3
    ribs = np.zeros((LOW, LOW), np.float32)
    for k in range(10):
        y = int(45 + dy + k * 17)
        for side in (-1, 1):
            centre = (int(128 + dx), y - 30)
            cv2.ellipse(ribs, centre, (95, 40), 0, 90 - side * 20, 90 - side * 80, 0.1, 2)
    anatomy += cv2.GaussianBlur(ribs, (0, 0), 0.8)
    anatomy = cv2.GaussianBlur(anatomy, (0, 0), 2)
    full_hr = cv2.resize(full + anatomy, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    if mask is not None and mask.any():
        air_hr = cv2.resize(base * 0.5 + anatomy, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        m = mask.astype(np.float32)
        soft = cv2.GaussianBlur(m, (0, 0), 1.5) * min(1.0, contrast)
        full_hr = full_hr * (1 - soft) + air_hr * soft
        edge = m - cv2.erode(m, np.ones((5, 5), np.uint8))
        full_hr += cv2.GaussianBlur(edge, (0, 0), 1.0) * 0.12 * contrast
    # Distractors at full resolution: tubes and skin folds.
    overlay = np.zeros((SIZE, SIZE), np.float32)
    if rng.random() < 0.35:
        cv2.polylines(overlay, [_curve(rng, (0, 380, 900, 640), 6)], False, 0.35, int(rng.integers(4, 9)))
    if rng.random() < 0.35:
        side = rng.choice([250, 720])
        cv2.polylines(overlay, [_curve(rng, (150, side - 80, 750, side + 80))], False, 0.1, 3)
    full_hr += cv2.GaussianBlur(overlay, (0, 0), 1.0)
    # Acquisition: gamma, contrast, brightness and noise.
    full_hr = np.clip(full_hr, 0, 1) ** rng.uniform(0.8, 1.25)
    full_hr = full_hr * rng.uniform(0.85, 1.15) + rng.uniform(-0.06, 0.06)
    grain = cv2.resize(rng.standard_normal((LOW, LOW)).astype(np.float32), (SIZE, SIZE))
    full_hr += (grain * 0.015 + rng.standard_normal((SIZE, 1), dtype=np.float32) * 0.005) * noise
    return np.clip(full_hr * 255.0, 0, 255).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray, tags: dict[str, str]) -> None:
    """Write a JPEG-baseline (1.2.840.10008.1.2.4.50) MONOCHROME2 DICOM atomically.

    Without pydicom's value checks: the real files break two rules (bare-number PatientAge,
    and ``ID_...`` SOPInstanceUIDs in stage 2), and so do these.
    """
    with dicom.lenient():
        _write_dicom(path, pixels, tags)


def _write_dicom(path: Path, pixels: np.ndarray, tags: dict[str, str]) -> None:
    ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.168, 0.168]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    with atomic.atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


@dataclass(frozen=True)
class _Item:
    index: int
    split: str
    image_id: str
    patient: int
    shape: int  # index into the shapes list, or -1 for a negative image
    extra_shape: int  # a second shape whose rows are added (several rows), or -1
    folder: str  # where the file goes, relative to the world


def _plan(spec: WorldSpec, n_shapes: int) -> list[_Item]:
    rng = np.random.default_rng(spec.seed)
    total = spec.n_train + spec.n_test
    n_patients = max(1, int(round(total / spec.images_per_patient)))
    patients = rng.integers(0, n_patients, size=total)
    items = []
    for i in range(total):
        positive = rng.random() < spec.positive_rate
        shape = int(rng.integers(n_shapes)) if positive else -1
        extra = int(rng.integers(n_shapes)) if positive and rng.random() < spec.multi_row_rate else -1
        image_id = f"{UID_ROOT}.{spec.seed * 100000 + i}.{1517875000 + i % 9973}.{int(rng.integers(100000, 999999))}"
        split = "train" if i < spec.n_train else "test"
        study = f"{UID_ROOT}.{spec.seed * 100000 + i}.{1517875000 + i % 9973}.2"
        folder = f"{study}/{study}.1"
        if spec.layout == "stage2" and split == "test":
            image_id, folder = f"ID_{int(rng.integers(16**9)):09x}", ""
        if spec.layout == "stage2":
            reupload = (
                "dicom-images-test"
                if split == "train" and i >= spec.n_train * (1 - spec.stage1_test_share)
                else "dicom-images-train"
            )
            folder = "stage_2_images" if split == "test" else f"siim/{reupload}/{folder}"
        else:
            folder = f"{'dicom-images-train' if split == 'train' else 'dicom-images-test'}/{folder}"
        items.append(_Item(i, split, image_id, int(patients[i]), shape, extra, folder))
    return items


def _rows_for(item: _Item, shapes: list[list[str]], lesion_scale: float = 1.0) -> list[str]:
    if item.shape < 0:
        return []
    rows = list(shapes[item.shape])
    if item.extra_shape >= 0:
        # Keep only the part of the second shape on the same lung side, so rows overlap or touch.
        rows += [r for r in shapes[item.extra_shape] if r not in rows]
    if lesion_scale != 1.0:
        rows = [rle.encode(shrink(rle.decode_union(rows), lesion_scale))]
    return rows


def shrink(mask: np.ndarray, factor: float) -> np.ndarray:
    """``mask`` scaled by ``factor`` about its centroid (a smaller pneumothorax in the same place)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    affine = np.float32([[factor, 0, (1 - factor) * cx], [0, factor, (1 - factor) * cy]])
    out = cv2.warpAffine(mask.astype(np.uint8), affine, (mask.shape[1], mask.shape[0]), flags=cv2.INTER_NEAREST)
    return out.astype(bool) if out.any() else mask.astype(bool)


_SHAPES: list[list[str]] = []


def _init_worker(shapes: list[list[str]]) -> None:
    global _SHAPES
    _SHAPES = shapes
    processes.steady_malloc()


def _make_one(args: tuple[_Item, str, WorldSpec]) -> None:
    item, out_dir, spec = args
    seed = spec.seed
    study = f"{UID_ROOT}.{seed * 100000 + item.index}.{1517875000 + item.index % 9973}.2"
    path = Path(out_dir) / item.folder / f"{item.image_id}.dcm"
    if path.exists():
        return
    rng = np.random.default_rng([seed, item.index])
    rows = _rows_for(item, _SHAPES, spec.lesion_scale)
    mask = rle.decode_union(rows) if rows else None
    pixels = render(rng, seed * 1_000_003 + item.patient, mask, spec.noise, spec.contrast)
    if spec.real_histogram:
        pixels = match_histogram(pixels)
    prng = np.random.default_rng([seed, item.patient, 7])
    tags = {
        "SOPInstanceUID": item.image_id,
        "StudyInstanceUID": study,
        "SeriesInstanceUID": f"{study}.1",
        "PatientID": item.image_id.rsplit(".", 1)[0] + ".p",  # per image, as in the real data
        "PatientName": item.image_id,
        "PatientSex": "M" if prng.random() < 0.55 else "F",
        "PatientAge": str(int(prng.integers(10, 90))),
        "ViewPosition": "PA" if rng.random() < 0.6 else "AP",
        "StudyDescription": "Chest X-Ray",
    }
    if item.image_id.startswith("ID_"):  # today's test files: no patient, no study or series UID
        tags.update(PatientID="", StudyInstanceUID="", SeriesInstanceUID="", PatientName="")
    write_dicom(path, pixels, tags)


def _write_labels(
    path: Path, items: list[_Item], shapes: list[list[str]], stage2: bool = False, lesion_scale: float = 1.0
) -> None:
    """Stage 1: ``ImageId, EncodedPixels`` with a space, as the real file; stage 2: no spaces, and
    the re-uploaded stage-1 test images carry one row each (the union), as in stage_2_train.csv."""
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        fh.write("ImageId,EncodedPixels\n" if stage2 else "ImageId, EncodedPixels\n")
        writer = csv.writer(fh)
        for item in items:
            rows = _rows_for(item, shapes, lesion_scale) or [rle.EMPTY]
            if stage2 and "dicom-images-test" in item.folder and rows != [rle.EMPTY]:
                rows = [rle.encode(rle.decode_union(rows))]
            for row in rows:
                writer.writerow([item.image_id, row if stage2 else " " + row])


def make_world(out_dir: str | Path, spec: WorldSpec, workers: int | None = None, progress: bool = True) -> Path:
    """Write a synthetic world (see the module docstring); a finished world is left alone.

    A world is finished when ``world.json`` holds the same spec; an interrupted run resumes,
    keeping the DICOMs already written.
    """
    if spec.layout not in LAYOUTS:
        raise ValueError(f"unknown synthetic layout {spec.layout!r}; choose one of {list(LAYOUTS)}")
    out_dir = Path(out_dir)
    stamp = out_dir / "world.json"
    if stamp.exists():
        old = {**asdict(WorldSpec()), "noise": 1.0, "contrast": 1.0, "lesion_scale": 1.0}
        old.update(json.loads(stamp.read_text()))  # worlds written before the difficulty knobs had the defaults
        old = {k: old.get(k) for k in asdict(spec)}
        if old == asdict(spec):
            return out_dir
        changed = sorted(k for k in asdict(spec) if old.get(k) != asdict(spec)[k])
        raise ValueError(
            f"{out_dir} holds another synthetic world (it differs in {changed}): remove it or pick another"
        )
    shapes = load_shapes()
    items = _plan(spec, len(shapes))
    workers = workers or os.cpu_count() or 1
    processes.single_threaded_opencv()  # before forking: see its docstring
    jobs = [(item, str(out_dir), spec) for item in items]
    bar = progress_bars.counter(len(jobs), "synthetic", progress, "img")
    if workers == 1:
        _init_worker(shapes)
        for job in jobs:
            _make_one(job)
            bar.update()
    else:
        with processes.mp_context().Pool(workers, _init_worker, (shapes,)) as pool:
            for _ in pool.imap_unordered(_make_one, jobs, chunksize=4):
                bar.update()
    bar.close()
    stage2 = spec.layout == "stage2"
    train_items, test_items = [i for i in items if i.split == "train"], [i for i in items if i.split == "test"]
    labels = out_dir / ("stage_2_train.csv" if stage2 else "train-rle.csv")
    _write_labels(labels, train_items, shapes, stage2, spec.lesion_scale)
    _write_labels(out_dir / "test-labels.csv", test_items, shapes, lesion_scale=spec.lesion_scale)
    if stage2:
        lines = ["ImageId,EncodedPixels"] + [f"{i.image_id},-1" for i in test_items]
        atomic.write_text(out_dir / "stage_2_sample_submission.csv", "\n".join(lines) + "\n")
    by_patient: dict[int, int] = defaultdict(int)
    with atomic.atomic_path(out_dir / "kaggle-to-nih-id.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Kaggle_ID", "NIH_ID"])
        for item in train_items if stage2 else items:
            by_patient[item.patient] += 1
            writer.writerow([item.image_id, f"{90000 + item.patient:08d}_{by_patient[item.patient] - 1:03d}.png"])
    atomic.write_json(stamp, asdict(spec))
    return out_dir
