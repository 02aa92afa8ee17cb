"""``make oof``: every fold's held-out images predicted as the test set is, for the post-processing search.

Fold ``k``'s segmenter (its ``segmentation.oof_weights``) predicts the images of fold ``k`` with the
views of ``infer.tta``, exactly as ``make infer`` predicts the test set with every fold, so the
thresholds searched on these maps apply to test maps made the same way; the classifier of fold ``k``
gives their gate probabilities, with the same views. A TTA edit therefore redoes these maps and the
search, never a training run. Writes ``oof/fold<k>.npy`` (uint8 p*255 at the final stage's size),
``oof/fold<k>_ids.csv``, ``oof/fold<k>_classifier.csv`` and, last, ``oof/summary.json`` (per fold: the
Dice at p > 0.5, the all-empty score, the gate's AUC, MCC, precision, recall and accuracy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from pneumothorax.data import datasets, prepared
from pneumothorax.data import folds as folds_mod
from pneumothorax.io import atomic, metric
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.models import devices, trained, tta


def predict_oof(
    cfg: Config,
    exp: ExperimentDir,
    processed: ProcessedDir,
    device: str | None = None,
    progress: bool = True,
    folds: list[int] | None = None,
) -> dict[str, Any]:
    """Predict the held-out images of every fold (or of ``folds``): maps, and gate probabilities with a
    classifier; write ``oof/summary.json`` last and return it.

    Raises:
        ValueError: a fold trained on another split than ``folds.csv`` (its OOF output would score images it
            trained on).
    """
    runtime = devices.setup_runtime(device)
    devices.fast_kernels(runtime.device, cfg.deterministic)
    masks = prepared.load_cache(processed.root, "masks", "train", cfg.final_size)
    summary: dict[str, Any] = {"tta": list(cfg.infer.tta), "weights": cfg.segmentation.oof_weights, "folds": []}
    for k in range(cfg.data.n_folds) if folds is None else folds:
        valid = held_out(exp, processed, k)
        fold = {"fold": k, "images": len(valid), "weights": segmentation_oof(cfg, exp, processed, k, runtime, progress)}
        dice, empty = oof_scores(exp.oof_maps(k), masks, valid)
        fold.update({"dice_at_0.5": dice, "all_empty": empty})
        if cfg.classifier.enabled:
            fold["classifier"] = classifier_oof(cfg, exp, processed, k, runtime.device)
        summary["folds"].append(fold)
    atomic.write_json(exp.oof_summary, summary)
    return summary


def held_out(exp: ExperimentDir, processed: ProcessedDir, k: int) -> pd.DataFrame:
    """The training rows of fold ``k`` (its validation images), in cache order."""
    rows = datasets.train_rows(processed.root, exp.folds)
    return rows[rows["fold"] == k]


def _check_split(exp: ExperimentDir, run: Any, k: int) -> None:
    folds_mod.check_split(run, pd.read_csv(exp.folds, dtype={"image_id": str}), k)


def segmentation_oof(
    cfg: Config, exp: ExperimentDir, processed: ProcessedDir, k: int, runtime: Any, progress: bool = False
) -> str:
    """Fold ``k``'s maps (``oof/fold<k>.npy``) and ids, from the weights ``segmentation.oof_weights``; their name."""
    seg, run = cfg.segmentation, exp.segmenter(k)
    _check_split(exp, run, k)
    valid = held_out(exp, processed, k)
    weights = trained.segmenter_weights(run, seg.oof_weights).stem
    model = trained.load_segmenter(cfg, run, weights, runtime.device)
    dataset = datasets.CacheDataset(
        processed.root, "train", cfg.final_size, valid["index"].to_numpy(), clahe=cfg.data.clahe
    )
    exp.oof.mkdir(parents=True, exist_ok=True)
    tta.predict_to_file(
        [model],
        dataset,
        exp.oof_maps(k),
        cfg.infer.tta,
        runtime.device,
        cfg.data.channels,
        cfg.infer.batch_size,
        seg.amp,
        seg.channels_last,
        cfg.data.workers,
        progress=progress,
        desc=f"oof fold {k}",
    )
    atomic.write_csv(exp.oof_ids(k), valid[["image_id", "index", "has_pneumothorax"]])
    return weights


def classifier_oof(
    cfg: Config, exp: ExperimentDir, processed: ProcessedDir, k: int, device: torch.device
) -> dict[str, float]:
    """Fold ``k``'s gate probabilities (``oof/fold<k>_classifier.csv``) and the gate's metrics on them."""
    c, run = cfg.classifier, exp.classifier(k)
    _check_split(exp, run, k)
    valid = held_out(exp, processed, k)
    model = trained.load_classifier(cfg, run, device)
    labels = valid["has_pneumothorax"].to_numpy()
    dataset = datasets.CacheDataset(
        processed.root, "train", c.size, valid["index"].to_numpy(), target="label", labels=labels, clahe=cfg.data.clahe
    )
    probs = tta.predict_labels(
        [model],
        dataset,
        cfg.infer.tta,
        device,
        cfg.data.channels,
        cfg.infer.batch_size,
        c.amp,
        False,
        channels_last=c.channels_last,
        workers=cfg.data.workers,
    )
    exp.oof.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"image_id": valid["image_id"].to_numpy(), "label": labels, "prob": probs})
    atomic.write_csv(exp.oof_gate(k), table)
    return metric.gate_metrics(labels, probs, c.threshold)


def oof_scores(maps_path: Any, masks: np.ndarray, valid: pd.DataFrame, chunk: int = 64) -> tuple[float, float]:
    """Mean Dice at p > 0.5 and the all-empty score of a fold's OOF maps, read in chunks (a 1024 fold
    does not fit in memory twice)."""
    probs = np.load(maps_path, mmap_mode="r")
    rows = valid["index"].to_numpy()
    dice, empty = [], []
    for start in range(0, len(rows), chunk):
        truth = masks[rows[start : start + chunk]] > 0
        dice.append(metric.dice_per_image(np.asarray(probs[start : start + chunk]) > 127, truth))
        empty.append(~truth.reshape(len(truth), -1).any(axis=1))
    return float(np.concatenate(dice).mean()), float(np.concatenate(empty).mean())
