"""``make folds``: K folds stratified by label and mask-area bin, grouped by NIH patient, into ``folds.csv``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pneumothorax.io import atomic
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir


def strata(has_pneumothorax: pd.Series, mask_area: pd.Series, n_bins: int = 4) -> np.ndarray:
    """0 for negative images; 1..n_bins for positive ones by mask-area quantile."""
    labels = np.zeros(len(has_pneumothorax), dtype=np.int64)
    positive = has_pneumothorax.to_numpy() == 1
    if positive.any() and n_bins > 1:
        areas = mask_area.to_numpy()[positive].astype(np.float64)
        edges = np.quantile(areas, np.linspace(0, 1, n_bins + 1)[1:-1])
        labels[positive] = 1 + np.searchsorted(edges, areas, side="right")
    elif positive.any():
        labels[positive] = 1
    return labels


def make_folds(meta: pd.DataFrame, n_folds: int = 5, seed: int = 42, area_bins: int = 4) -> pd.DataFrame:
    """Assign a fold to every training image.

    Args:
        meta: rows with image_id, has_pneumothorax (0/1), mask_area and patient (an image
            without a known patient carries its own id, so it is its own group).

    Returns:
        image_id, patient, has_pneumothorax, mask_area, stratum, fold; deterministic for a seed.

    Raises:
        ValueError: when there are fewer patients than folds, or (never expected) a patient
            ends up in two folds.
    """
    meta = meta.reset_index(drop=True)
    if meta["patient"].nunique() < n_folds:
        raise ValueError(f"{meta['patient'].nunique()} patients cannot fill {n_folds} folds")
    y = strata(meta["has_pneumothorax"], meta["mask_area"], area_bins)
    # Rare strata (fewer members than folds) would make sklearn warn; fold them into their neighbour.
    counts = np.bincount(y)
    for label in np.flatnonzero((counts > 0) & (counts < n_folds)):
        y[y == label] = 1 if label > 1 else label
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(meta), -1, dtype=np.int64)
    for k, (_, valid) in enumerate(splitter.split(np.zeros(len(meta)), y, groups=meta["patient"].to_numpy())):
        fold[valid] = k
    out = meta[["image_id", "patient", "has_pneumothorax", "mask_area"]].copy()
    out["stratum"] = y
    out["fold"] = fold
    leaks = out.groupby("patient")["fold"].nunique()
    if (leaks > 1).any():
        raise ValueError(f"patient {leaks[leaks > 1].index[0]} is in two folds")
    return out


def write_folds(cfg: Config, processed: ProcessedDir, exp: ExperimentDir) -> pd.DataFrame:
    """The experiment's patient-grouped, stratified split; ``folds.csv`` is rewritten only when it changes."""
    meta = pd.read_csv(processed.metadata, dtype={"image_id": str, "patient": str}, keep_default_na=False)
    train = meta[(meta["split"] == "train") & (meta["error"] == "")]
    table = make_folds(train, cfg.data.n_folds, cfg.fold_seed, cfg.data.area_bins)
    exp.root.mkdir(parents=True, exist_ok=True)
    atomic.write_text_if_changed(exp.folds, table.to_csv(index=False))
    return table
