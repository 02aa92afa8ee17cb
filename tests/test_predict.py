"""Prediction on new images: any size and format, masks at the image's own size, a row for every file."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from pneumothorax.data import datasets
from pneumothorax.io import config, dicom_seg, resize, rle
from pneumothorax.io.paths import ExperimentDir
from pneumothorax.pipeline import predict
from pneumothorax.post.postprocess import PostProcess

from .conftest import DCM_301


class Bright(torch.nn.Module):
    """Predicts pneumothorax where the input is bright: a known answer to check sizes and placement against."""

    def forward(self, x):
        return (x[:, :1] - 1.0) * 20


def test_predict_writes_a_row_mask_and_overlay_per_file(tmp_path, monkeypatch):
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    wide = np.zeros((300, 400), np.uint16)
    wide[100:200, 50:150] = 60000  # a bright square in a 16-bit, non-square PNG
    cv2.imwrite(str(folder / "wide.png"), wide)
    colour = np.zeros((256, 256, 3), np.uint8)
    cv2.imwrite(str(folder / "sub" / "dark.jpg"), colour)
    (folder / "broken.png").write_bytes(b"not a png")
    with pydicom.dcmread(DCM_301) as ds:
        for keyword in ("PatientBirthDate", "StudyDate", "ReferringPhysicianName", "AccessionNumber"):
            delattr(ds, keyword)  # type 2 attributes files in the wild (and the synthetic worlds) omit
        ds.save_as(folder / "real.dcm")
        del ds.StudyInstanceUID  # readable, but no DICOM SEG can reference it
        ds.save_as(folder / "no_study.dcm")
    exp = ExperimentDir(tmp_path / "models" / "toy", 64)
    exp.root.mkdir(parents=True)
    exp.postprocess.write_text(json.dumps({"postprocess": PostProcess("b_r", 0.5, 0.0).to_dict()}))
    cfg = config.load("tiny", ["classifier.enabled=false", "infer.tta=[hflip]"])
    monkeypatch.setattr(predict, "load_members", lambda e, d: ([predict.Member(cfg, 1.0, [Bright()], [])], 64))
    out = tmp_path / "out"
    table = predict.predict_folder(exp, folder, out, device="cpu", progress=False, write_seg=True).set_index("file")
    assert sorted(table.index) == ["broken.png", "no_study.dcm", "real.dcm", "sub/dark.jpg", "wide.png"]  # a row each
    assert "not a readable image" in table.loc["broken.png", "error"] and pd.isna(table.loc["broken.png", "rle"])
    row = table.loc["wide.png"]
    assert (row["width"], row["height"]) == (400, 300) and row["has_pneumothorax"]
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "wide.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert mask.shape == (300, 400) and mask[150, 100] and not mask[20, 300]  # at the image's size, in place
    assert abs(int(mask.sum()) - 100 * 100) < 0.15 * 100 * 100 and row["area_px"] == mask.sum()
    assert (rle.decode(row["rle"], (300, 400)) > 0).tolist() == mask.tolist()
    assert not table.loc["sub/dark.jpg", "has_pneumothorax"] and table.loc["sub/dark.jpg", "rle"] == "-1"
    spacing = pydicom.dcmread(DCM_301).PixelSpacing
    real = table.loc["real.dcm"]
    assert real["area_px"] > 0  # bright bone, for this model
    assert real["area_mm2"] == round(real["area_px"] * float(spacing[0]) * float(spacing[1]), 2)
    assert (tmp_path / "out" / "overlays" / "sub__dark.png").exists()
    overlay = cv2.imread(str(tmp_path / "out" / "overlays" / "wide.png"))
    assert overlay.shape == (300, 400, 3) and (overlay[..., 2] > overlay[..., 0] + 100).any()  # a red outline
    # The DICOM SEG of the DICOM input holds the very mask, over its image; the PNG inputs get none.
    assert table.loc["real.dcm", "dicom_seg"] == "dicom_seg/real.dcm" and pd.isna(table.loc["wide.png", "dicom_seg"])
    png_mask = cv2.imread(str(out / "masks" / "real.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert (dicom_seg.read_mask(out / "dicom_seg" / "real.dcm") == png_mask).all()
    seg = pydicom.dcmread(out / "dicom_seg" / "real.dcm")
    source = pydicom.dcmread(DCM_301)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert (
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    # A source no SEG can be made from keeps its mask and RLE; the row says why there is no SEG.
    odd = table.loc["no_study.dcm"]
    assert odd["rle"] == real["rle"] and "no DICOM SEG" in odd["error"] and "StudyInstanceUID" in odd["error"]
    assert not (out / "dicom_seg" / "no_study.dcm").exists()


def test_an_experiment_never_searched_is_named_before_any_image_is_read(tmp_path):
    (tmp_path / "in").mkdir()
    exp = ExperimentDir(tmp_path / "models" / "nosuch")
    with pytest.raises(FileNotFoundError, match=r"nosuch: no finished experiment or ensemble there.*EXP=nosuch"):
        predict.predict_folder(exp, tmp_path / "in", tmp_path / "out", "cpu", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_new_images_are_equalized_as_the_models_saw_them_in_training():
    """``make predict`` downsizes and equalizes (``data.clahe``) each image as the caches and datasets did."""
    image = np.random.default_rng(3).integers(60, 120, (256, 300), dtype=np.uint8)
    for clahe in (0.0, 2.0):
        cfg = config.load("tiny", [f"data.clahe={clahe}"])
        batch = predict._batch([image], 64, cfg, torch.device("cpu"), False)
        cached = datasets.to_tensor(datasets.equalize(resize.downscale(image, 64), clahe))
        assert torch.equal(batch, datasets.model_input(cached[None], cfg.data.channels, torch.device("cpu")))
    assert not torch.equal(batch, predict._batch([image], 64, config.load("tiny"), torch.device("cpu"), False))
