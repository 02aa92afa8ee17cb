"""Exact, fast search of post-processing thresholds on out-of-fold predictions.

The rules are :class:`~pneumothorax.post.postprocess.PostProcess`'s (B-TH, R-TH counted in 1024x1024
pixels as ``count * (1024/H) * (1024/W)``, the gate, the triplet, minimum components); the
search returns one of them.

Instead of re-thresholding every map for every grid point, one pass per image builds
histograms of the pixels by how many thresholds they exceed, inside and outside the truth;
reverse cumulative sums then give the predicted area and the intersection at *every*
threshold at once. Scores are exact: the same as thresholding each map (see the tests).
``uint8`` maps mean ``p / 255`` evaluated in float64; float maps are compared in their own
dtype, as ``probs > b`` does in NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numba
import numpy as np

from pneumothorax.io.config import PostprocessConfig
from pneumothorax.io.metric import dice_from_counts, roc_auc
from pneumothorax.post.postprocess import FULL, PostProcess, gate_score, peaks


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


@dataclass(frozen=True)
class OOFPart:
    """One fold's out-of-fold maps, their truth at the same size, and their gate probabilities."""

    probs: np.ndarray  # (N, H, W) uint8 p*255 (a memory map is fine)
    masks: np.ndarray  # (N, H, W) bool
    gate: np.ndarray | None  # (N,) or None when the gate is off


@dataclass(frozen=True)
class GateInputs:
    """Per OOF image, pooled over the folds: the classifier's probability and the map's peak probabilities."""

    classifier: np.ndarray  # (N,)
    peaks: dict[float, np.ndarray]  # per postprocess.gate_top fraction: (N,) each map's peak (postprocess.peak)


@dataclass(frozen=True)
class SearchResult:
    """The chosen decision, its low-resolution OOF score, and what it was compared with."""

    post: PostProcess
    score: float  # mean Dice at the maps' resolution (the search's estimate)
    all_empty_score: float
    no_postprocess_score: float  # B-TH 0.5, nothing else
    grid: np.ndarray  # (B, R) mean Dice at the chosen gate
    b_values: list[float]
    gates: list[float]
    gate_best: np.ndarray  # (G,) best score at each gate
    min_component_scores: dict[int, float] = field(default_factory=dict)
    gate_auc: list[float] = field(default_factory=list)  # per fold: the AUC of the chosen gate score (gate on)


def _pooled_counts(parts: Sequence[OOFPart], thresholds: list[float]) -> Counts:
    """Counts of every part at every threshold, one part at a time (memory: one fold's maps)."""
    counts = [threshold_counts(part.probs, part.masks, thresholds) for part in parts]
    return Counts(
        np.asarray(thresholds),
        np.concatenate([c.pred for c in counts]),
        np.concatenate([c.inter for c in counts]),
        np.concatenate([c.true_area for c in counts]),
        counts[0].scale,
    )


def _best_b_r(counts: Counts, n_b: int, gate_probs: np.ndarray | None, gates: list[float], pp: PostprocessConfig):
    """The best (gate, B-TH, R-TH) over the grid; the first ``n_b`` thresholds of ``counts`` are B-TH's."""
    sub = Counts(counts.thresholds[:n_b], counts.pred[:, :n_b], counts.inter[:, :n_b], counts.true_area, counts.scale)
    grid = gated_grid(sub, gate_probs, gates, pp.r_th)  # (G, B, R)
    g, b, r = np.unravel_index(int(np.argmax(grid)), grid.shape)
    post = PostProcess("b_r", float(counts.thresholds[b]), float(pp.r_th[r]), float(gates[g]))
    return post, float(grid[g, b, r]), grid


def _best_blend(counts: Counts, n_b: int, gated: GateInputs | None, gates: list[float], pp: PostprocessConfig):
    """The best (gate blend, peak fraction, gate, B-TH, R-TH): :func:`_best_b_r` at each of ``postprocess.gate_blend``'s
    weights and ``gate_top``'s fractions (the first in the lists' order wins a tie); with no gate, the blend is 0.
    A zero blend reads no peak, so it is searched once."""
    best = None
    blends = pp.gate_blend if gated is not None else (0.0,)
    for blend, top in [(b, t) for b in blends for t in (pp.gate_top if b else pp.gate_top[:1])]:
        scores = None if gated is None else gate_score(gated.classifier, gated.peaks[top], blend)
        post, score, grid = _best_b_r(counts, n_b, scores, gates, pp)
        if best is None or score > best[1]:
            best = (replace(post, gate_blend=float(blend), gate_top=float(top) if blend else 0.0), score, grid, scores)
    return best


def _refine_components(
    parts: Sequence[OOFPart], post: PostProcess, candidates: Sequence[int], n_images: int
) -> dict[int, float]:
    """Exact scores of minimum component sizes at the chosen B-TH/R-TH/gate (components are not
    histogram-friendly)."""
    scores = {}
    for size in candidates:
        rule = replace(post, min_component=int(size))
        scores[int(size)] = sum(float(d) for part in parts for d in rule_scores(part, rule)[0]) / n_images
    return scores


def rule_scores(part: OOFPart, rule: PostProcess) -> tuple[np.ndarray, np.ndarray]:
    """Per image of ``part``, the Dice of ``rule.decide`` and the true area, one map at a time (memory: one map)."""
    dice, true_area = np.empty(len(part.probs)), np.empty(len(part.probs), dtype=np.int64)
    for i in range(len(part.probs)):
        gate = None if part.gate is None else float(part.gate[i])
        pred, truth = rule.decide(np.asarray(part.probs[i]), gate), np.asarray(part.masks[i])
        true_area[i] = truth.sum()
        dice[i] = dice_from_counts((pred & truth).sum(), pred.sum(), true_area[i])
    return dice, true_area


def _gate_inputs(parts: Sequence[OOFPart], tops: Sequence[float]) -> GateInputs | None:
    """The classifier's probabilities and the maps' peaks at each fraction of every part (None when the gate is
    off); peaks are read a part at a time (memory: one fold's maps)."""
    if parts[0].gate is None:
        return None
    per_part = [peaks(p.probs, tops) for p in parts]
    pooled = {top: np.concatenate([part[top] for part in per_part]) for top in tops}
    return GateInputs(np.concatenate([p.gate for p in parts]), pooled)


def _fold_aucs(parts: Sequence[OOFPart], true_area: np.ndarray, scores: np.ndarray | None) -> list[float]:
    """Per part (fold), the ROC AUC of ``scores`` (the chosen gate score) against image-level truth."""
    if scores is None:
        return []
    ends = np.cumsum([len(p.probs) for p in parts])[:-1]
    return [roc_auc(t > 0, s) for t, s in zip(np.split(true_area, ends), np.split(scores, ends), strict=True)]


def search_oof(parts: Sequence[OOFPart], pp: PostprocessConfig) -> SearchResult:
    """Search gate blend x gate x B-TH x R-TH (and the triplet and minimum components when configured) on OOF maps."""
    b_values = list(pp.b_th.values())
    wanted = {0.5, *pp.triplet_top, *pp.triplet_bottom} if pp.triplet else {0.5}
    all_th = b_values + sorted(wanted - set(b_values))
    counts = _pooled_counts(parts, all_th)
    gated = _gate_inputs(parts, pp.gate_top)
    gates = list(pp.gate) if gated is not None else [0.0]
    post, score, grid, gate_scores = _best_blend(counts, len(b_values), gated, gates, pp)
    if pp.triplet:
        keep = None if gate_scores is None or post.gate <= 0 else gate_scores >= post.gate
        tgrid = triplet_grid(counts, pp.triplet_top, pp.triplet_area, pp.triplet_bottom, keep)
        t, a, c = np.unravel_index(int(np.argmax(tgrid)), tgrid.shape)
        if tgrid[t, a, c] > score:
            triplet = (float(pp.triplet_top[t]), float(pp.triplet_area[a]), float(pp.triplet_bottom[c]))
            post = replace(post, rule="triplet", r_th=0.0, min_component=0, triplet=triplet)
            score = float(tgrid[t, a, c])
    component_scores = {}
    if any(c > 0 for c in pp.min_component) and post.rule == "b_r":
        component_scores = _refine_components(parts, post, pp.min_component, len(counts.true_area))
        size = max(component_scores, key=component_scores.get)
        if component_scores[size] > score:
            post, score = replace(post, min_component=size), component_scores[size]
    all_empty = float((counts.true_area == 0).mean())
    if all_empty > score:  # no candidate beats predicting nothing: say so and predict nothing
        post, score = replace(post, rule="empty", min_component=0, triplet=None), all_empty
    j = all_th.index(0.5)
    plain = float(dice_from_counts(counts.inter[:, j], counts.pred[:, j], counts.true_area).mean())
    g = gates.index(post.gate) if post.gate in gates else 0
    gate_best = grid.reshape(len(gates), -1).max(axis=1)
    aucs = _fold_aucs(parts, counts.true_area, gate_scores)
    return SearchResult(post, score, all_empty, plain, grid[g], b_values, gates, gate_best, component_scores, aucs)


def crossfit_oof(parts: Sequence[OOFPart], pp: PostprocessConfig) -> dict:
    """Leave one fold out of the search: for each part, the rule :func:`search_oof` chooses on the other parts,
    scored on that part (mean per-image Dice at the maps' resolution). The pooled gain over all-empty is what a
    searched rule does on images it was not chosen on, which the in-sample ``search_oof`` score overstates."""
    dice, empty, folds = [], [], []
    for k, held in enumerate(parts):
        post = search_oof([p for j, p in enumerate(parts) if j != k], pp).post
        part_dice, true_area = rule_scores(held, post)
        dice.append(part_dice)
        empty.append(true_area == 0)
        found = int((dice[-1][~empty[-1]] > 0).sum())
        folds.append(
            {"part": k, "rule": post.describe(), "gain": float(dice[-1].mean() - empty[-1].mean()), "found": found}
        )
    score, all_empty = float(np.concatenate(dice).mean()), float(np.concatenate(empty).mean())
    return {"score": score, "all_empty": all_empty, "gain": score - all_empty, "folds": folds}
