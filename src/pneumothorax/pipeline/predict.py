"""``make predict INPUT=<folder> EXP=<experiment or ensemble>``: a trained model on new chest X-rays.

Any folder of DICOM (any size, MONOCHROME1 or 2, 8 to 16 bits), PNG or JPEG files (searched
recursively; 16-bit and colour PNGs are brought to 8-bit grey) goes through the experiment's
folds (or an ensemble's members, weighted), with the experiment's TTA and gate, and its saved
:class:`~pneumothorax.post.postprocess.PostProcess`, applied at each image's own size. Writes, under
``predictions/<name>/``:

- ``predictions.csv``: file, width, height, probability (the gate's when the experiment has one,
  else the largest pixel probability), has_pneumothorax, area_px, area_mm2 (where the DICOM gives
  PixelSpacing), rle (the competition's relative column-major RLE over the image's own size),
  error (an unreadable file still gets its row, with the reason);
- ``masks/<file>.png`` (0/255 at the image's size) and ``overlays/<file>.png`` (the contour on the image);
- with ``write_seg``, ``dicom_seg/<file>.dcm`` per DICOM input: a DICOM Segmentation object that
  references its image, so that a DICOM viewer overlays it (column ``dicom_seg``; a source that no
  object can be made from keeps its mask and RLE, and the reason goes into ``error``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from pneumothorax import __version__
from pneumothorax.data import datasets
from pneumothorax.io import atomic, dicom, dicom_seg, images, progress_bars, resize, rle
from pneumothorax.io import config as config_mod
from pneumothorax.io import layout as layout_mod
from pneumothorax.io.config import Config
from pneumothorax.io.errors import MissingFileError
from pneumothorax.io.paths import ExperimentDir, PredictionDir
from pneumothorax.models import devices, trained, tta
from pneumothorax.post import postprocess


@dataclass
class Image:
    """One input file: its pixels (uint8 grey) and pixel area in mm² (DICOM), or why it could not be read."""

    path: Path
    pixels: np.ndarray | None = None
    pixel_area_mm2: float | None = None
    error: str = ""


def read(path: Path) -> Image:
    """A DICOM, PNG or JPEG file as 8-bit grey (16-bit stretched to its range, colour converted), or its error."""
    try:
        pixels, meta = images.read(path)
    except (dicom.DicomError, images.ImageError) as exc:
        return Image(path, error=str(exc))
    return Image(path, pixels, meta.get("pixel_area_mm2"))


def inputs(folder: Path) -> list[Path]:
    """Every DICOM, PNG and JPEG file below ``folder`` (hidden files skipped), in path order."""
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: INPUT is not a folder")
    found = layout_mod.walk_images([folder])
    if not found:
        raise MissingFileError(f"{folder}: no DICOM, PNG or JPEG file in it")
    return found


@dataclass
class Member:
    """One experiment's trained folds, ready to predict."""

    cfg: Config
    weight: float
    segmenters: list[torch.nn.Module]
    gates: list[torch.nn.Module]


def _trained_config(exp: ExperimentDir) -> Config:
    """The config an experiment's folds were trained with (saved beside them)."""
    path = exp.segmenter(0).config
    if not path.exists():
        raise MissingFileError(f"{path}: {exp.root} has no trained fold 0; train it first (make train)")
    return config_mod.from_yaml(path.read_text())


def load_members(exp: ExperimentDir, device: torch.device) -> tuple[list[Member], int]:
    """The experiment's folds, or an ensemble's members with their weights; and the size maps are blended at."""
    if exp.ensemble.exists():
        record = json.loads(exp.ensemble.read_text())
        names = [row["experiment"] for row in record["members"]]
        parts = [(ExperimentDir(exp.root.parent / n), w) for n, w in zip(names, record["weights"], strict=True)]
    else:
        parts = [(exp, 1.0)]
    members = []
    for member_exp, weight in parts:
        cfg = _trained_config(member_exp)
        folds = range(cfg.data.n_folds)
        seg = [trained.load_segmenter(cfg, member_exp.segmenter(k), cfg.infer.weights, device) for k in folds]
        gates = (
            [trained.load_classifier(cfg, member_exp.classifier(k), device) for k in folds]
            if cfg.classifier.enabled
            else []
        )
        members.append(Member(cfg, weight, seg, gates))
    return members, max(m.cfg.final_size for m in members)


def _batch(images: list[np.ndarray], size: int, cfg: Config, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Images at ``size`` as a model input batch (channels_last where the model is)."""
    small = np.stack([datasets.equalize(resize.downscale(image, size), cfg.data.clahe) for image in images])[:, None]
    return datasets.model_input(torch.from_numpy(small), cfg.data.channels, device, channels_last)


@torch.no_grad()
def predict_maps(
    members: list[Member], images: list[np.ndarray], size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probability maps (B, size, size) uint8 p*255 of the weighted members, and the mean gate (or None)."""
    total = np.zeros((len(images), size, size), np.float32)
    gates = []
    for m in members:
        seg_size = m.cfg.final_size
        probs = tta.predict_batch(
            m.segmenters,
            _batch(images, seg_size, m.cfg, device, m.cfg.segmentation.channels_last),
            m.cfg.infer.tta,
            m.cfg.segmentation.amp,
        )
        probs = probs[:, 0].float().cpu().numpy()
        if seg_size != size:
            probs = np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR) for p in probs])
        total += m.weight * probs
        if m.gates:
            x = _batch(images, m.cfg.classifier.size, m.cfg, device, m.cfg.classifier.channels_last)
            gates.append(tta.labels_batch(m.gates, x, m.cfg.infer.tta, m.cfg.classifier.amp).cpu().numpy())
    maps = np.clip(np.rint(total * 255.0), 0, 255).astype(np.uint8)
    return maps, (np.mean(gates, axis=0) if gates else None)


def overlay(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image in grey with the predicted outline in red."""
    out = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), max(1, round(max(pixels.shape) / 512)))
    return out


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", image)
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())


def _row(image: Image, name: str, mask: np.ndarray | None, probability: float | None) -> dict[str, Any]:
    if mask is None:
        return {
            "file": name,
            "width": None,
            "height": None,
            "probability": None,
            "has_pneumothorax": None,
            "area_px": None,
            "area_mm2": None,
            "rle": None,
            "dicom_seg": None,
            "error": image.error,
        }
    area = int(mask.sum())
    mm2 = round(area * image.pixel_area_mm2, 2) if image.pixel_area_mm2 else None
    return {
        "file": name,
        "width": mask.shape[1],
        "height": mask.shape[0],
        "probability": round(probability, 6),
        "has_pneumothorax": bool(area),
        "area_px": area,
        "area_mm2": mm2,
        "rle": rle.encode(mask),
        "dicom_seg": None,
        "error": "",
    }


def _write_outputs(image: Image, name: str, mask: np.ndarray, out: PredictionDir, seg_algorithm: str | None) -> dict:
    """The mask and overlay PNGs (and the DICOM SEG when asked, for a DICOM input); what the row records."""
    stem = name.replace("/", "__").rsplit(".", 1)[0]
    _write_png(out.mask(stem), mask.astype(np.uint8) * 255)
    _write_png(out.overlay(stem), overlay(image.pixels, mask))
    if seg_algorithm is None or image.path.suffix.lower() != ".dcm":
        return {}
    try:
        dicom_seg.write(image.path, mask, out.segmentation(stem), seg_algorithm, __version__)
    except dicom.DicomError as exc:
        return {"error": str(exc)}
    return {"dicom_seg": str(out.segmentation(stem).relative_to(out.root))}


def _chunks(paths: list[Path], size: int) -> Iterator[list[Image]]:
    for start in range(0, len(paths), size):
        yield [read(p) for p in paths[start : start + size]]


def predict_folder(
    exp: ExperimentDir,
    folder: Path,
    out_dir: Path,
    device: str | None = None,
    progress: bool = True,
    write_seg: bool = False,
) -> pd.DataFrame:
    """Predict every image below ``folder`` with experiment (or ensemble) ``exp``; write the CSV, masks,
    overlays (and a DICOM SEG per DICOM input with ``write_seg``)."""
    if not postprocess.adopt_old_name(exp).exists():
        raise MissingFileError(
            f"{exp.root}: no finished experiment or ensemble there (no {exp.postprocess.name}): run "
            f"`make train infer search EXP={exp.name}` or `make ensemble ... NAME={exp.name}` first"
        )
    out = PredictionDir(Path(out_dir))
    post, _ = postprocess.load(exp.postprocess)
    runtime = devices.setup_runtime(device)
    members, size = load_members(exp, runtime.device)
    devices.fast_kernels(runtime.device, any(m.cfg.deterministic for m in members))
    paths, rows = inputs(folder), []
    batch = members[0].cfg.infer.batch_size
    for chunk in progress_bars.bar(
        _chunks(paths, batch), "predict", progress, total=-(-len(paths) // batch), unit="batch"
    ):
        good = [im for im in chunk if im.pixels is not None]
        maps, gates = predict_maps(members, [im.pixels for im in good], size, runtime.device) if good else (None, None)
        results = {id(im): k for k, im in enumerate(good)}
        for image in chunk:
            name = str(image.path.relative_to(folder))
            k = results.get(id(image))
            if k is None:
                rows.append(_row(image, name, None, None))
                continue
            gate = None if gates is None else float(gates[k])
            mask = post.apply(maps[k], gate, image.pixels.shape)
            written = _write_outputs(image, name, mask, out, exp.root.name if write_seg else None)
            rows.append(_row(image, name, mask, gate if gate is not None else float(maps[k].max()) / 255.0) | written)
    table = pd.DataFrame(rows).astype({"width": "Int64", "height": "Int64", "area_px": "Int64"})
    atomic.write_csv(out.table, table)
    return table
