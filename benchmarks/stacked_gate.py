"""Would a stacked gate beat the searched blend? An offline probe on runs ``make bench-real`` trained.

The searched gate score is ``(1 - w) * classifier probability + w * the map's peak`` (``postprocess.gate_blend``,
``gate_top``). A stacked gate instead fits a logistic regression of the image label on the classifier's logit,
the logits of the map's peak read four ways (the highest pixel, the mean of its top 1/1024, 1/256 and 1/64) and
the log areas above 0.5 and 0.3, and the search then thresholds its probability (a fine gate grid, 0.30 to 0.98).
Per experiment or ensemble (as ``crossfit_search.py`` reads them) it prints and saves, in
``benchmarks/results/stacked_gate.json``, against the searched blend (its own grid, and the fine one):
per fold the stacker's AUC (fitted on the other folds); the gain over all-empty when the stacker and the search
are both fitted on every fold (what a product would report, in sample); and the gain with both left one fold out.

    .venv/bin/python benchmarks/stacked_gate.py real_bf16 real_bf16_s1 real_ensemble
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402
from crossfit_search import oof_parts  # noqa: E402

from pneumothorax.io import metric, paths  # noqa: E402
from pneumothorax.io.config import PostprocessConfig  # noqa: E402
from pneumothorax.io.paths import ProcessedDir  # noqa: E402
from pneumothorax.post import exact_search  # noqa: E402
from pneumothorax.post.exact_search import OOFPart  # noqa: E402
from pneumothorax.post.postprocess import peaks  # noqa: E402

TOPS = (0.0, 1 / 1024, 1 / 256, 1 / 64)
FEATURES = {"classifier + peak (top 1/256)": [0, 3], "all seven": list(range(7))}
STRENGTHS = (0.1, 1.0)  # LogisticRegression's C
FINE_GATES = tuple(np.round(np.arange(0.30, 0.981, 0.02), 2).tolist())


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def features(part: OOFPart) -> np.ndarray:
    """(N, 7) per image: the classifier's logit, the peaks' logits at ``TOPS``, log(1 + area) above 0.5 and 0.3."""
    peak = peaks(part.probs, TOPS)
    flat = np.asarray(part.probs).reshape(len(part.probs), -1)
    areas = [np.log1p((flat > 127).sum(axis=1)), np.log1p((flat > 76).sum(axis=1))]  # uint8: p > 0.5, p > 0.3
    return np.stack([_logit(part.gate), *[_logit(peak[t]) for t in TOPS], *areas], axis=1)


def _fit(x: np.ndarray, y: np.ndarray, strength: float) -> LogisticRegression:
    return LogisticRegression(C=strength, max_iter=1000).fit(x, y)


def _gains(parts: list[OOFPart], grid: PostprocessConfig) -> dict:
    found = exact_search.search_oof(parts, grid)
    crossfit = exact_search.crossfit_oof(parts, grid)
    return {
        "in_sample": found.score - found.all_empty_score,
        "crossfit": crossfit["gain"],
        "auc": found.gate_auc,
        "rule": found.post.describe(),
    }


def labels(part: OOFPart) -> np.ndarray:
    """(N,) bool per image: whether its truth has a pixel."""
    return np.asarray(part.masks[:]).reshape(len(part.probs), -1).any(axis=1)


def _with_gates(parts: list[OOFPart], gates: list[np.ndarray]) -> list[OOFPart]:
    return [dataclasses.replace(p, gate=g) for p, g in zip(parts, gates, strict=True)]


def stacked(
    parts: list[OOFPart], tables: list[np.ndarray], truth: list[np.ndarray], grid: PostprocessConfig, strength: float
) -> dict:
    """The stacker on these feature ``tables`` (per part, as :func:`features` gives, columns chosen) and image
    ``truth``: its AUC per fold and its gains, in sample and with one fold left out of both fits."""
    held_out = []
    for k in range(len(parts)):
        others = [j for j in range(len(parts)) if j != k]
        model = _fit(np.concatenate([tables[j] for j in others]), np.concatenate([truth[j] for j in others]), strength)
        held_out.append(model.predict_proba(tables[k])[:, 1])
    everywhere = _fit(np.concatenate(tables), np.concatenate(truth), strength)
    stack_grid = dataclasses.replace(grid, gate=FINE_GATES, gate_blend=(0.0,), gate_top=(0.0,))
    found = exact_search.search_oof(_with_gates(parts, [everywhere.predict_proba(t)[:, 1] for t in tables]), stack_grid)
    crossfit = exact_search.crossfit_oof(_with_gates(parts, held_out), stack_grid)
    return {
        "auc_held_out": [metric.roc_auc(t, g) for t, g in zip(truth, held_out, strict=True)],
        "in_sample": found.score - found.all_empty_score,
        "crossfit": crossfit["gain"],
        "rule": found.post.describe(),
    }


def probe(name: str, models: Path, processed: ProcessedDir) -> dict:
    grid, parts = oof_parts(name, models, processed)
    fine = dataclasses.replace(grid, gate=FINE_GATES)
    result = {"blend": _gains(parts, grid), "blend_fine_gates": _gains(parts, fine)}
    tables, truth = [features(p) for p in parts], [labels(p) for p in parts]  # once: every stacker reads them
    for label, columns in FEATURES.items():
        chosen = [t[:, columns] for t in tables]
        for strength in STRENGTHS:
            result[f"stack {label}, C {strength:g}"] = stacked(parts, chosen, truth, grid, strength)
    for key, row in result.items():
        auc = " / ".join(f"{a:.3f}" for a in row.get("auc_held_out", row.get("auc", [])))
        print(f"{name} {key}: in sample {row['in_sample']:+.4f}, one fold left out {row['crossfit']:+.4f}, AUC {auc}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exps", nargs="+", help="experiments or ensembles trained by make bench-real")
    p.add_argument("--models", default=str(paths.MODELS / "bench-real"))
    p.add_argument("--processed", default=str(paths.PROCESSED / "bench-real" / "siim-real-bench"))
    args = p.parse_args()
    save("stacked_gate", {n: probe(n, Path(args.models), ProcessedDir(args.processed)) for n in args.exps})


if __name__ == "__main__":
    main()
