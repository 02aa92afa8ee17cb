"""Exact, fast search of post-processing thresholds on out-of-fold predictions.

A pixel is predicted where ``p > B-TH``. An image is emptied when its predicted area,
counted in 1024x1024 pixels (``count * (1024/H) * (1024/W)``), is below R-TH, or when its
classifier probability is below the gate threshold. The 1st place's triplet rule empties an
image unless ``count(p > top)`` (scaled) reaches ``area``, and then predicts ``p > bottom``.

Instead of re-thresholding every map for every grid point, one pass per image builds
histograms of the pixels by how many thresholds they exceed, inside and outside the truth;
reverse cumulative sums then give the predicted area and the intersection at *every*
threshold at once. Scores are exact: the same as thresholding each map (see the tests).
``uint8`` maps mean ``p / 255`` evaluated in float64; float maps are compared in their own
dtype, as ``probs > b`` does in NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from .metric import dice_from_counts

FULL = 1024


@numba.njit(cache=True, parallel=True, nogil=True)
def _hist_u8(probs: np.ndarray, masks: np.ndarray, lut: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    n = probs.shape[0]
    pred = np.zeros((n, n_bins), dtype=np.int64)
    inter = np.zeros((n, n_bins), dtype=np.int64)
    for i in numba.prange(n):
        local = np.zeros(256, dtype=np.int64)
        local_in = np.zeros(256, dtype=np.int64)
        img = probs[i]
        msk = masks[i]
        for r in range(img.shape[0]):
            for c in range(img.shape[1]):
                v = img[r, c]
                local[v] += 1
                if msk[r, c]:
                    local_in[v] += 1
        for v in range(256):
            pred[i, lut[v]] += local[v]
            inter[i, lut[v]] += local_in[v]
    return pred, inter


@numba.njit(cache=True, parallel=True, nogil=True)
def _hist_float(probs: np.ndarray, masks: np.ndarray, sorted_th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = probs.shape[0]
    n_bins = sorted_th.shape[0] + 1
    pred = np.zeros((n, n_bins), dtype=np.int64)
    inter = np.zeros((n, n_bins), dtype=np.int64)
    for i in numba.prange(n):
        img = probs[i]
        msk = masks[i]
        for r in range(img.shape[0]):
            for c in range(img.shape[1]):
                k = np.searchsorted(sorted_th, img[r, c], side="left")  # thresholds strictly below p
                pred[i, k] += 1
                if msk[r, c]:
                    inter[i, k] += 1
    return pred, inter


@dataclass(frozen=True)
class Counts:
    """Per image and threshold: predicted pixels and intersection; per image: true pixels."""

    thresholds: np.ndarray  # (T,) in the caller's order
    pred: np.ndarray  # (N, T) pixels with p > threshold
    inter: np.ndarray  # (N, T) of those, inside the truth
    true_area: np.ndarray  # (N,)
    scale: float  # (1024 / H) * (1024 / W): map pixels -> 1024x1024 pixels


def threshold_counts(probs: np.ndarray, masks: np.ndarray, thresholds: Sequence[float], chunk: int = 256) -> Counts:
    """One pass over the maps: areas and intersections at every threshold (streamed in chunks)."""
    if probs.shape != masks.shape or probs.ndim != 3:
        raise ValueError(f"probs {probs.shape} and masks {masks.shape} must both be (N, H, W)")
    th = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(th, kind="stable")
    sorted_th = th[order]
    n, h, w = probs.shape
    is_u8 = probs.dtype == np.uint8
    if is_u8:
        lut = np.searchsorted(sorted_th, np.arange(256, dtype=np.float64) / 255.0, side="left").astype(np.int64)
    else:
        sorted_cast = sorted_th.astype(probs.dtype)
    hists_pred, hists_inter, true_area = [], [], []
    for start in range(0, n, chunk):
        p = np.ascontiguousarray(probs[start : start + chunk])
        m = np.ascontiguousarray(masks[start : start + chunk]).astype(np.bool_, copy=False)
        if is_u8:
            hp, hi = _hist_u8(p, m, lut, len(th) + 1)
        else:
            hp, hi = _hist_float(p, m, sorted_cast)
        hists_pred.append(hp)
        hists_inter.append(hi)
        true_area.append(m.reshape(len(m), -1).sum(axis=1))
    hp = np.concatenate(hists_pred) if hists_pred else np.zeros((0, len(th) + 1), np.int64)
    hi = np.concatenate(hists_inter) if hists_inter else np.zeros((0, len(th) + 1), np.int64)
    # pixels above sorted threshold j = those in bins k > j: reverse cumulative sum, drop bin 0
    above = np.cumsum(hp[:, ::-1], axis=1)[:, ::-1][:, 1:]
    above_in = np.cumsum(hi[:, ::-1], axis=1)[:, ::-1][:, 1:]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return Counts(
        th,
        above[:, inverse],
        above_in[:, inverse],
        np.concatenate(true_area) if true_area else np.zeros(0, np.int64),
        (FULL / h) * (FULL / w),
    )


def _dice_grid(counts: Counts, b_idx: np.ndarray, r_th: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Per-image Dice (N, B, R); ``keep`` (N,) false = gated to empty."""
    pred = counts.pred[:, b_idx]
    inter = counts.inter[:, b_idx]
    truth = counts.true_area[:, None]
    raw = dice_from_counts(inter, pred, truth)  # (N, B)
    empty_score = (counts.true_area == 0).astype(np.float64)  # what an emptied image scores
    removed = pred[:, :, None] * counts.scale < r_th[None, None, :]  # (N, B, R)
    out = np.where(removed, empty_score[:, None, None], raw[:, :, None])
    if keep is not None:
        out = np.where(keep[:, None, None], out, empty_score[:, None, None])
    return out


def grid_search(probs: np.ndarray, masks: np.ndarray, b_th: Sequence[float], r_th: Sequence[float]) -> np.ndarray:
    """Mean competition Dice for every (B-TH, R-TH): shape ``(len(b_th), len(r_th))``.

    Args:
        probs: (N, H, W) float in [0, 1], or uint8 meaning p / 255.
        masks: (N, H, W) bool truth.
    """
    counts = threshold_counts(probs, masks, b_th)
    return _dice_grid(counts, np.arange(len(b_th)), np.asarray(r_th, dtype=np.float64)).mean(axis=0)


def grid_search_brute(probs: np.ndarray, masks: np.ndarray, b_th: Sequence[float], r_th: Sequence[float]) -> np.ndarray:
    """The same scores by thresholding every map for every grid point (reference; slow)."""
    n, h, w = probs.shape
    scale = (FULL / h) * (FULL / w)
    values = probs.astype(np.float64) / 255.0 if probs.dtype == np.uint8 else probs
    masks = masks.astype(bool)
    out = np.zeros((len(b_th), len(r_th)))
    for i, b in enumerate(b_th):
        pred = values > b
        area = pred.reshape(n, -1).sum(axis=1)
        for j, r in enumerate(r_th):
            kept = pred & (area * scale >= r)[:, None, None]
            inter = (kept & masks).reshape(n, -1).sum(axis=1)
            out[i, j] = dice_from_counts(
                inter, kept.reshape(n, -1).sum(axis=1), masks.reshape(n, -1).sum(axis=1)
            ).mean()
    return out


def gated_grid(
    counts: Counts, gate_probs: np.ndarray | None, gates: Sequence[float], r_th: Sequence[float]
) -> np.ndarray:
    """Mean Dice over (gate, B-TH, R-TH); an image with gate probability below the gate is empty."""
    r = np.asarray(r_th, dtype=np.float64)
    b_idx = np.arange(len(counts.thresholds))
    per_image = _dice_grid(counts, b_idx, r)  # (N, B, R)
    empty_score = (counts.true_area == 0).astype(np.float64)
    out = np.empty((len(gates), len(b_idx), len(r)))
    for g, gate in enumerate(gates):
        if gate_probs is None or gate <= 0:
            out[g] = per_image.mean(axis=0)
            continue
        keep = gate_probs >= gate
        out[g] = (per_image[keep].sum(axis=0) + empty_score[~keep].sum()) / len(empty_score)
    return out


def triplet_grid(
    counts: Counts,
    tops: Sequence[float],
    areas: Sequence[float],
    bottoms: Sequence[float],
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Mean Dice over (top, area, bottom) of the triplet rule; ``counts`` must hold tops and bottoms."""
    index = {float(t): i for i, t in enumerate(counts.thresholds)}
    empty_score = (counts.true_area == 0).astype(np.float64)
    out = np.empty((len(tops), len(areas), len(bottoms)))
    for a, top in enumerate(tops):
        big = counts.pred[:, index[float(top)]] * counts.scale  # (N,)
        for c, bottom in enumerate(bottoms):
            j = index[float(bottom)]
            raw = dice_from_counts(counts.inter[:, j], counts.pred[:, j], counts.true_area)
            for b, area in enumerate(areas):
                score = np.where(big >= area, raw, empty_score)
                if keep is not None:
                    score = np.where(keep, score, empty_score)
                out[a, b, c] = score.mean()
    return out


def apply(
    probs: np.ndarray,
    b_th: float,
    r_th: float = 0.0,
    min_component: int = 0,
    gate_prob: float | None = None,
    gate: float = 0.0,
    triplet: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Post-process one (H, W) probability map (float, or uint8 meaning p/255) into a bool mask."""
    values = probs.astype(np.float64) / 255.0 if probs.dtype == np.uint8 else probs
    h, w = values.shape
    scale = (FULL / h) * (FULL / w)
    if gate_prob is not None and gate > 0 and gate_prob < gate:
        return np.zeros((h, w), dtype=bool)
    if triplet is not None:
        top, area, bottom = triplet
        if (values > top).sum() * scale < area:
            return np.zeros((h, w), dtype=bool)
        mask = values > bottom
    else:
        mask = values > b_th
    if min_component > 0 and mask.any():
        mask = remove_small(mask, min_component / scale)
    if mask.sum() * scale < r_th:
        return np.zeros((h, w), dtype=bool)
    return mask


def remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_pixels`` pixels."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def search(cfg: Any, exp_dir: Path, processed: Path) -> dict[str, Any]:
    """Search post-processing on the out-of-fold predictions of every fold of an experiment.

    Writes ``thresholds.json`` (chosen values, their score, the all-empty score, the score
    at B-TH 0.5 without post-processing), ``grid.csv`` (every B-TH x R-TH at the chosen gate)
    and ``heatmap.png``. Returns the JSON's content.
    """
    import pandas as pd

    from . import files, prepare

    pp = cfg.postprocess
    size = cfg.segmentation.stages[-1].size
    probs_parts, ids_parts = [], []
    for k in range(cfg.data.n_folds):
        fold_dir = exp_dir / f"fold{k}"
        probs_parts.append(np.load(fold_dir / "oof.npy", mmap_mode="r"))
        ids_parts.append(pd.read_csv(fold_dir / "oof_ids.csv", dtype={"image_id": str}))
    ids = pd.concat(ids_parts, ignore_index=True)
    masks_cache = prepare.load_cache(processed, "masks", "train", size)
    # one pass per fold keeps memory at one fold's maps
    b_values = list(pp.b_th.values())
    extra = (
        sorted({*pp.triplet_top, *pp.triplet_bottom, 0.5} - set(b_values))
        if pp.triplet
        else sorted({0.5} - set(b_values))
    )
    all_th = b_values + extra
    parts = []
    for probs, part in zip(probs_parts, ids_parts, strict=True):
        masks = masks_cache[part["index"].to_numpy()] > 0
        parts.append(threshold_counts(probs, masks, all_th))
    counts = Counts(
        np.asarray(all_th),
        np.concatenate([c.pred for c in parts]),
        np.concatenate([c.inter for c in parts]),
        np.concatenate([c.true_area for c in parts]),
        parts[0].scale,
    )
    gate_probs = None
    gates = list(pp.gate) if cfg.classifier.enabled else [0.0]
    if cfg.classifier.enabled:
        oof = pd.concat(
            [
                pd.read_csv(exp_dir / "classifier" / f"fold{k}" / "oof.csv", dtype={"image_id": str})
                for k in range(cfg.data.n_folds)
            ]
        )
        gate_probs = ids["image_id"].map(dict(zip(oof["image_id"], oof["prob"], strict=True))).to_numpy(np.float64)
        if np.isnan(gate_probs).any():
            raise ValueError("classifier OOF probabilities are missing for some segmentation OOF images")
    b_idx = np.arange(len(b_values))
    sub = Counts(
        counts.thresholds[b_idx], counts.pred[:, b_idx], counts.inter[:, b_idx], counts.true_area, counts.scale
    )
    grid = gated_grid(sub, gate_probs, gates, pp.r_th)  # (G, B, R)
    g, b, r = np.unravel_index(int(np.argmax(grid)), grid.shape)
    best = {
        "rule": "b_r",
        "b_th": b_values[b],
        "r_th": int(pp.r_th[r]),
        "gate": float(gates[g]),
        "min_component": 0,
        "score": float(grid[g, b, r]),
    }
    keep = None if gate_probs is None or gates[g] <= 0 else gate_probs >= gates[g]
    if pp.triplet:
        tgrid = triplet_grid(counts, pp.triplet_top, pp.triplet_area, pp.triplet_bottom, keep)
        t, a, bt = np.unravel_index(int(np.argmax(tgrid)), tgrid.shape)
        if tgrid[t, a, bt] > best["score"]:
            best.update(
                rule="triplet",
                triplet=[float(pp.triplet_top[t]), int(pp.triplet_area[a]), float(pp.triplet_bottom[bt])],
                score=float(tgrid[t, a, bt]),
            )
    comp_scores = {}
    if any(c > 0 for c in pp.min_component) and best["rule"] == "b_r":
        # Components are not histogram-friendly: refine at the chosen B-TH/R-TH/gate only, exactly.
        for c in pp.min_component:
            total = 0.0
            for probs, part in zip(probs_parts, ids_parts, strict=True):
                masks = masks_cache[part["index"].to_numpy()] > 0
                gp = None if gate_probs is None else gate_probs[ids.index[ids["image_id"].isin(part["image_id"])]]
                for i in range(len(part)):
                    pred = apply(
                        np.asarray(probs[i]),
                        best["b_th"],
                        best["r_th"],
                        int(c),
                        None if gp is None else float(gp[i]),
                        best["gate"],
                    )
                    total += float(dice_from_counts((pred & masks[i]).sum(), pred.sum(), masks[i].sum()))
            comp_scores[int(c)] = total / len(ids)
        c_best = max(comp_scores, key=comp_scores.get)
        if comp_scores[c_best] > best["score"]:
            best.update(min_component=c_best, score=comp_scores[c_best])
    all_empty = float((counts.true_area == 0).mean())
    if all_empty > best["score"]:  # no candidate beats predicting nothing: say so and predict nothing
        best.update(rule="empty", score=all_empty)
    j05 = all_th.index(0.5)
    plain = float(dice_from_counts(counts.inter[:, j05], counts.pred[:, j05], counts.true_area).mean())
    result = {
        **best,
        "all_empty_score": all_empty,
        "no_postprocess_score": plain,
        "n_images": int(len(ids)),
        "size": int(size),
        "min_component_scores": comp_scores,
    }
    frame = pd.DataFrame(grid[g], index=pd.Index(b_values, name="b_th"), columns=[f"r_th={int(x)}" for x in pp.r_th])
    files.write_csv(exp_dir / "grid.csv", frame.reset_index())
    if gate_probs is not None:
        gate_table = pd.DataFrame({"gate": gates, "best_score": grid.reshape(len(gates), -1).max(axis=1)})
        files.write_csv(exp_dir / "gate_scores.csv", gate_table)
    plot_heatmap(
        grid[g],
        b_values,
        list(pp.r_th),
        exp_dir / "heatmap.png",
        f"OOF Dice (gate {gates[g]:g}); best {grid[g, b, r]:.4f} at B-TH {b_values[b]:g}, R-TH {int(pp.r_th[r])}",
    )
    files.write_json(exp_dir / "thresholds.json", result)
    return result


def plot_heatmap(grid: np.ndarray, b_values: list[float], r_values: list[float], path: Path, title: str) -> None:
    """Heatmap of Dice over B-TH (y) x R-TH (x)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from . import files

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(
        grid,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(-0.5, len(r_values) - 0.5, b_values[0], b_values[-1]) if len(b_values) > 1 else None,
    )
    ax.set_xticks(range(len(r_values)), [str(int(r)) for r in r_values], rotation=45)
    ax.set_xlabel("R-TH (pixels at 1024x1024)")
    ax.set_ylabel("B-TH")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="mean Dice")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
