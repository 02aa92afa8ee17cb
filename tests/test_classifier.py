"""Classifier gate: learning, resuming, metrics, and encoder pre-training from an external label CSV."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pneumothorax import classifier, config, models, prepare, train
from pneumothorax.train import Interrupted

TINY = ["data.sizes=[32, 64]", "data.n_folds=2"]


def test_gate_metrics_by_hand():
    labels = np.array([1, 1, 0, 0, 0])
    probs = np.array([0.9, 0.4, 0.6, 0.1, 0.2])
    m = classifier.gate_metrics(labels, probs, 0.5)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["accuracy"] == 0.6
    assert m["auc"] == pytest.approx(5 / 6)


def test_classifier_learns_and_resumes(processed, tmp_path):
    cfg = config.load("demo", [*TINY, "classifier.size=64", "classifier.epochs=3"])
    out = tmp_path / "cls"
    with pytest.raises(Interrupted):
        classifier.train_classifier_fold(cfg, 0, processed, out, device="cpu", progress=False, max_epochs=2)
    summary = classifier.train_classifier_fold(cfg, 0, processed, out, device="cpu", progress=False)
    assert len(pd.read_csv(out / "metrics.csv")) == 3
    oof = pd.read_csv(out / "oof.csv")
    folds = pd.read_csv(processed / "folds.csv")
    assert len(oof) == (folds["fold"] == 0).sum() and oof["prob"].between(0, 1).all()
    for key in ("auc", "mcc", "precision", "recall", "accuracy"):
        assert key in summary
    assert (out / "metrics.json").exists() and (out / "model.pt").exists()


@pytest.mark.slow
def test_classifier_auc_beats_chance(processed, tmp_path):
    cfg = config.load("demo", [*TINY, "classifier.size=64", "classifier.epochs=20"])
    summary = classifier.train_classifier_fold(cfg, 1, processed, tmp_path / "cls", device="cpu", progress=False)
    assert summary["auc"] > 0.7  # 0.82 measured; chance is 0.5


def test_external_pretraining_initialises_the_encoder(processed, tmp_path):
    meta = pd.read_csv(processed / "metadata.csv", dtype={"image_id": str}, keep_default_na=False)
    train_rows = meta[meta["split"] == "train"].head(24)
    images = prepare.load_cache(processed, "images", "train", 64)
    folder = tmp_path / "external"
    folder.mkdir()
    for i, row in enumerate(train_rows.itertuples()):
        cv2.imwrite(str(folder / f"img{i}.png"), np.asarray(images[row.index]))
    table = pd.DataFrame(
        {"path": [f"img{i}.png" for i in range(len(train_rows))], "label": train_rows["has_pneumothorax"].to_numpy()}
    )
    table.to_csv(folder / "labels.csv", index=False)
    cfg = config.load(
        "demo", [*TINY, "classifier.size=32", "classifier.epochs=1", f"classifier.external_csv={folder / 'labels.csv'}"]
    )
    out = tmp_path / "models" / "demo" / "pretrain"
    classifier.pretrain_external(cfg, cfg.classifier.external_csv, out, device="cpu", progress=False)
    assert (out / "model.pt").exists() and len(pd.read_csv(out / "metrics.csv")) == 1
    seg_cfg = replace(cfg.segmentation, encoder_weights="none")
    seg = models.create_segmenter(seg_cfg, 1)
    report = models.init_encoder_from_classifier(seg, models.load_state_dict_file(out / "model.pt"))
    assert report["missing"] == [] and len(report["loaded"]) == len(seg.encoder.state_dict())
    source = train.encoder_init_source("pretrain", tmp_path / "models" / "demo" / "fold0", 0)
    assert source == out / "model.pt"
    pretrained = torch.load(out / "model.pt", weights_only=True)
    assert torch.equal(seg.encoder.state_dict()["model.conv1.0.weight"], pretrained["conv1.0.weight"])


def test_external_csv_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,1\nb.png,2\n")
    with pytest.raises(ValueError, match="line 3: label 2"):
        classifier.read_external_csv(bad)
    bad.write_text("path,label\na.png,1\nmissing.png,0\n")
    with pytest.raises(ValueError, match="line 3: image .*missing.png not found"):
        classifier.read_external_csv(bad)
