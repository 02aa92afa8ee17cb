"""``make search``: the post-processing searched on an experiment's out-of-fold predictions, re-scored at 1024.

``search`` reads every fold's out-of-fold maps (``make oof``; refusing a fold trained on another split),
searches the post-processing at the maps' resolution (:func:`pneumothorax.post.exact_search.search_oof`),
then re-scores the chosen :class:`~pneumothorax.post.postprocess.PostProcess` at 1024x1024 with the
exact competition metric against the original RLE rows, through the same encoding the
submission uses, and saves both scores in ``postprocess.json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumothorax.data import folds, prepared
from pneumothorax.io import atomic, plots, rle
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.post import exact_search, submission
from pneumothorax.post.postprocess import PostProcess


@dataclass(frozen=True)
class FoldOOF:
    """One fold's out-of-fold maps with their ids and gate probabilities (None: gate off)."""

    ids: pd.DataFrame  # image_id, index (row in the train caches), has_pneumothorax
    maps: np.ndarray  # memory map (N, S, S) uint8
    gate: np.ndarray | None


def oof_folds(cfg: Config, exp: ExperimentDir) -> Iterator[FoldOOF]:
    """Every fold's OOF output, one at a time; a fold trained on another split than ``folds.csv`` is refused."""
    split = pd.read_csv(exp.folds, dtype={"image_id": str})
    for k in range(cfg.data.n_folds):
        run = exp.segmenter(k)
        folds.check_split(run, split, k)
        ids = pd.read_csv(exp.oof_ids(k), dtype={"image_id": str})
        gate = None
        if cfg.classifier.enabled:
            folds.check_split(exp.classifier(k), split, k)
            probs = pd.read_csv(exp.oof_gate(k), dtype={"image_id": str})
            gate = ids["image_id"].map(dict(zip(probs["image_id"], probs["prob"], strict=True))).to_numpy(float)
            if np.isnan(gate).any():
                raise ValueError(f"{exp.oof_gate(k)}: gate probabilities missing for images of fold {k}")
        yield FoldOOF(ids, np.load(exp.oof_maps(k), mmap_mode="r"), gate)


def rescore_full(parts: list[FoldOOF], post: PostProcess, labels: Path, progress: bool = True) -> dict[str, Any]:
    """The competition metric of ``post`` on the OOF images at 1024x1024, against the label CSV's RLE rows."""
    truth_all = rle.read_labels(labels, rle.SHAPE)
    pred, truth = {}, {}
    for part in parts:
        gates = [None] * len(part.ids) if part.gate is None else list(part.gate)
        rows = np.arange(len(part.ids))
        encoded = submission.encode(part.maps, rows, gates, post, "OOF at 1024", progress)
        for image_id, value in zip(part.ids["image_id"], encoded, strict=True):
            pred[image_id] = [] if value == rle.EMPTY else [value]
            truth[image_id] = truth_all.get(image_id, [])
    return submission.score_rows(pred, truth)


class CacheRows:
    """``cache[rows] > 0`` read lazily, a slice at a time (the truth of the OOF images, never all in memory)."""

    def __init__(self, cache: np.ndarray, rows: np.ndarray) -> None:
        self.cache, self.rows = cache, np.asarray(rows)
        self.shape = (len(self.rows), *cache.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.cache[self.rows[key]]) > 0


def _search_parts(cfg: Config, parts: list[FoldOOF], processed: ProcessedDir) -> list[exact_search.OOFPart]:
    """The folds' OOF maps with their truth read lazily from the prepared mask cache at the maps' size."""
    masks = prepared.load_cache(processed.root, "masks", "train", cfg.final_size)
    return [exact_search.OOFPart(p.maps, CacheRows(masks, p.ids["index"].to_numpy()), p.gate) for p in parts]


def oof_parts(cfg: Config, exp: ExperimentDir, processed: ProcessedDir) -> list[exact_search.OOFPart]:
    """What the search reads of the experiment: per fold its OOF maps, their truth and gate probabilities."""
    return _search_parts(cfg, list(oof_folds(cfg, exp)), processed)


def crossfit(cfg: Config, exp: ExperimentDir, processed: ProcessedDir) -> dict[str, Any]:
    """The search left one fold out (``exact_search.crossfit_oof``) on the experiment's OOF maps; writes nothing."""
    return exact_search.crossfit_oof(oof_parts(cfg, exp, processed), cfg.postprocess)


def search(cfg: Config, exp: ExperimentDir, processed: ProcessedDir, progress: bool = True) -> dict[str, Any]:
    """Search post-processing on the experiment's OOF maps, re-score the choice at full resolution, and write
    ``postprocess.json`` (decision and scores), ``grid.csv``, ``gate_scores.csv`` and ``heatmap.png``."""
    parts = list(oof_folds(cfg, exp))
    found = exact_search.search_oof(_search_parts(cfg, parts, processed), cfg.postprocess)
    full = rescore_full(parts, found.post, prepared.labels_path(processed.root), progress)
    return write_decision(exp, found, full, list(cfg.postprocess.r_th), cfg.final_size)


def write_decision(
    exp: ExperimentDir, found: exact_search.SearchResult, full: dict[str, Any], r_values: list[float], size: int
) -> dict[str, Any]:
    """``postprocess.json`` (the decision, the search's estimate, the full-resolution score, the baselines),
    ``grid.csv``, ``gate_scores.csv`` and ``heatmap.png``; returns what the JSON holds."""
    result = {
        "postprocess": found.post.to_dict(),
        "score_full_resolution": full["score"],
        "score_search": found.score,
        "all_empty_score": found.all_empty_score,
        "no_postprocess_score": found.no_postprocess_score,
        "full_resolution": full,
        "n_images": full["n_images"],
        "size": size,
        "min_component_scores": found.min_component_scores,
        "gate_auc": found.gate_auc,  # per fold, of the chosen gate score (postprocess.gate_blend); [] without a gate
    }
    frame = pd.DataFrame(
        found.grid, index=pd.Index(found.b_values, name="b_th"), columns=[f"r_th={int(x)}" for x in r_values]
    )
    atomic.write_csv(exp.grid, frame.reset_index())
    if len(found.gates) > 1:
        atomic.write_csv(exp.gate_scores, pd.DataFrame({"gate": found.gates, "best_score": found.gate_best}))
    title = f"OOF Dice (gate {found.post.gate:g}); best {found.grid.max():.4f}; chosen: {found.post.describe()}"
    plots.plot_heatmap(found.grid, found.b_values, r_values, exp.heatmap, title)
    atomic.write_json(exp.postprocess, result)
    return result
