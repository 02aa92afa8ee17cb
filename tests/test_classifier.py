"""Classifier gate: learning, resuming, metrics, and encoder pre-training from an external label CSV."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pneumothorax.data import prepared
from pneumothorax.io import config, paths
from pneumothorax.models import factory
from pneumothorax.predict import oof
from pneumothorax.train import checkpoints, classifier, segmentation
from pneumothorax.train.trainer import Interrupted

TINY = ["data.sizes=[32, 64]", "data.n_folds=2"]


def _experiment(processed, root):
    import shutil

    out = paths.ExperimentDir(root, 64)
    out.root.mkdir(parents=True)
    shutil.copy(processed / "folds.csv", out.folds)
    return out


@pytest.mark.trains
def test_classifier_resumes_exactly_and_predicts_its_held_out_images(processed, tmp_path):
    cfg = config.load("demo", [*TINY, "classifier.size=64", "classifier.epochs=3"])
    whole = _experiment(processed, tmp_path / "whole")
    classifier.train_classifier_fold(cfg, 0, processed, whole, device="cpu", progress=False)
    parts = _experiment(processed, tmp_path / "parts")
    with pytest.raises(Interrupted):
        classifier.train_classifier_fold(cfg, 0, processed, parts, device="cpu", progress=False, max_epochs=2)
    assert not parts.classifier(0).model.exists()
    summary = classifier.train_classifier_fold(cfg, 0, processed, parts, device="cpu", progress=False)
    a, b = pd.read_csv(whole.classifier(0).metrics), pd.read_csv(parts.classifier(0).metrics)
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    wa = checkpoints.load_checkpoint(whole.classifier(0).model)["state_dict"]
    wb = checkpoints.load_checkpoint(parts.classifier(0).model)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary["weights"] == "best"
    # make oof: the held-out images' gate probabilities, with the views of infer.tta; without TTA they are the
    # very probabilities the training summary scored
    plain = replace(cfg, infer=replace(cfg.infer, tta=()))
    metrics = oof.classifier_oof(plain, parts, paths.ProcessedDir(processed), 0, torch.device("cpu"))
    table = pd.read_csv(parts.oof_gate(0), dtype={"image_id": str})
    folds = pd.read_csv(parts.folds, dtype={"image_id": str})
    assert sorted(table["image_id"]) == sorted(folds.loc[folds["fold"] == 0, "image_id"])
    assert table["prob"].between(0, 1).all() and table["prob"].std() > 0  # not a constant
    labels, probs = table["label"].to_numpy(), table["prob"].to_numpy()
    assert summary["accuracy"] == pytest.approx(((probs >= 0.5) == labels).mean()) == metrics["accuracy"]
    assert summary["auc"] == pytest.approx(metrics["auc"])


@pytest.mark.trains
def test_the_gate_can_be_its_best_epochs_averaged_or_its_ema(processed, exp):
    sets = [*TINY, "classifier.size=64", "classifier.epochs=3", "classifier.top_k=2", "classifier.ema_decay=0.9"]
    cfg = config.load("demo", [*sets, "classifier.weights=topk"])
    summary = classifier.train_classifier_fold(cfg, 0, processed, exp, device="cpu", progress=False)
    run = exp.classifier(0)
    model, topk, ema = (checkpoints.load_checkpoint(run.weights(w)) for w in ("model", "topk", "ema"))
    assert summary["weights"] == "topk" and all(torch.equal(model["state_dict"][k], topk[k]) for k in topk)
    assert any(not torch.equal(topk[k], ema[k]) for k in topk if topk[k].is_floating_point())
    # what the summary scored is what make oof predicts with model.pt (no TTA: the same views)
    plain = replace(cfg, infer=replace(cfg.infer, tta=()))
    metrics = oof.classifier_oof(plain, exp, paths.ProcessedDir(processed), 0, torch.device("cpu"))
    assert summary["auc"] == pytest.approx(metrics["auc"])
    # another choice of weights is another run: retrained, and model.pt is then the EMA
    again = classifier.train_classifier_fold(
        config.load("demo", [*sets, "classifier.weights=ema"]), 0, processed, exp, device="cpu", progress=False
    )
    model = checkpoints.load_checkpoint(run.model)["state_dict"]
    ema = checkpoints.load_checkpoint(run.weights("ema"))
    assert again["weights"] == "ema" and all(torch.equal(model[k], ema[k]) for k in ema)


@pytest.mark.trains
def test_classifier_auc_beats_chance(processed, exp):
    cfg = config.load("demo", [*TINY, "classifier.size=64", "classifier.epochs=20"])
    summary = classifier.train_classifier_fold(cfg, 1, processed, exp, device="cpu", progress=False)
    assert summary["auc"] > 0.7  # 0.82 measured; chance is 0.5


@pytest.mark.trains
def test_external_pretraining_initialises_the_encoder(processed, tmp_path):
    meta = pd.read_csv(processed / "metadata.csv", dtype={"image_id": str}, keep_default_na=False)
    train_rows = meta[meta["split"] == "train"].head(24)
    images = prepared.load_cache(processed, "images", "train", 64)
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
    seg = factory.create_segmenter(seg_cfg, 1)
    report = factory.init_encoder_from_classifier(seg, factory.load_state_dict_file(out / "model.pt"))
    assert report["missing"] == [] and len(report["loaded"]) == len(seg.encoder.state_dict())
    source = segmentation.encoder_init_source("pretrain", paths.ExperimentDir(tmp_path / "models" / "demo"), 0)
    assert source == out / "model.pt"
    pretrained = factory.load_state_dict_file(out / "model.pt")
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
