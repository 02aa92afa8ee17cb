"""The competition metric (mean over images of the Dice coefficient), and the gate's metrics.

An image where truth and prediction are both empty scores 1; a non-empty prediction on an
empty truth scores 0 (and so does an empty prediction on a non-empty truth).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def dice_from_counts(intersection: np.ndarray, pred_area: np.ndarray, true_area: np.ndarray) -> np.ndarray:
    """Per-image Dice from intersection and areas (any broadcastable shapes)."""
    intersection = np.asarray(intersection, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * intersection / np.where(total > 0, total, 1.0), 1.0)
    return dice


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice for a batch ``(N, H, W)`` (or one ``(H, W)`` image) of binary masks."""
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    if pred.ndim == 2:
        pred, truth = pred[None], truth[None]
    axes = tuple(range(1, pred.ndim))
    inter = np.logical_and(pred, truth).sum(axis=axes)
    return dice_from_counts(inter, pred.sum(axis=axes), truth.sum(axis=axes))


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """The competition score of a batch of binary masks."""
    return float(dice_per_image(pred, truth).mean())


def iou_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image IoU with the same empty conventions as the Dice (both empty = 1)."""
    dice = dice_per_image(pred, truth)
    return dice / (2.0 - dice)


def dice_table(image_ids: Sequence[str], pred: np.ndarray, truth: np.ndarray) -> pd.DataFrame:
    """A per-image table: image_id, dice, true_area, pred_area, intersection."""
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    axes = tuple(range(1, pred.ndim))
    inter = np.logical_and(pred, truth).sum(axis=axes)
    pa, ta = pred.sum(axis=axes), truth.sum(axis=axes)
    return pd.DataFrame(
        {
            "image_id": list(image_ids),
            "dice": dice_from_counts(inter, pa, ta),
            "true_area": ta,
            "pred_area": pa,
            "intersection": inter,
        }
    )


def gate_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, MCC, precision, recall and accuracy of ``probs >= threshold`` against 0/1 ``labels``.

    From counts and ranks rather than scikit-learn's metrics, whose import (about a second) every training
    process would pay; ``test_metric.py::test_gate_metrics_equal_scikit_learns`` holds them equal.
    """
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(probs) >= threshold).astype(int)
    tp, fp = int(((pred == 1) & (labels == 1)).sum()), int(((pred == 1) & (labels == 0)).sum())
    fn, tn = int(((pred == 0) & (labels == 1)).sum()), int(((pred == 0) & (labels == 0)).sum())
    denominator = float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return {
        "auc": roc_auc(labels, probs),
        "mcc": (tp * tn - fp * fn) / denominator**0.5 if denominator > 0 else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": (tp + tn) / len(labels) if len(labels) else float("nan"),
        "threshold": float(threshold),
    }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve (the Mann-Whitney U of the positives' ranks, ties averaged); NaN unless
    both classes are present."""
    labels = np.asarray(labels).astype(int)
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))
