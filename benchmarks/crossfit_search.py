"""How much of a searched OOF gain is the search choosing on the images it is scored on: leave one fold out.

For each fold of an experiment trained by ``make bench-real`` (its OOF maps and gate probabilities under
``models/bench-real/<exp>``), the post-processing search of ``make search`` runs on the other folds' OOF maps
only, and its choice is scored on the held-out fold at the maps' resolution (the search's own metric: mean
per-image Dice). The pooled cross-fitted score against all-empty is an estimate of the gain that the in-sample
``oof_gain_over_all_empty`` of ``bench_real.json`` overstates. Writes ``benchmarks/results/crossfit_search.json``.

    .venv/bin/python benchmarks/crossfit_search.py real_cpu real_c19
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from pneumothorax.data import prepared  # noqa: E402
from pneumothorax.io import config, metric, paths  # noqa: E402
from pneumothorax.io.paths import ExperimentDir  # noqa: E402
from pneumothorax.pipeline import search  # noqa: E402
from pneumothorax.post import exact_search  # noqa: E402


def crossfit(name: str, models: Path, processed: Path) -> dict:
    """Per held-out fold: the rule searched on the other folds, its gain over all-empty there; then pooled."""
    cfg = config.load(paths.CONFIGS / f"{name}.yaml")
    folds = list(search.oof_folds(cfg, ExperimentDir(models / name)))
    masks = prepared.load_cache(processed, "masks", "train", cfg.final_size)
    parts = [exact_search.OOFPart(f.maps, search.CacheRows(masks, f.ids["index"].to_numpy()), f.gate) for f in folds]
    dice, empty, per_fold = [], [], []
    for k, held in enumerate(parts):
        post = exact_search.search_oof([p for j, p in enumerate(parts) if j != k], cfg.postprocess).post
        truth = np.asarray(held.masks[:])
        gates = [None] * len(truth) if held.gate is None else held.gate
        pred = np.stack([post.decide(np.asarray(held.probs[i]), gates[i]) for i in range(len(truth))])
        dice.append(metric.dice_per_image(pred, truth))
        empty.append(~truth.reshape(len(truth), -1).any(axis=1))
        gain = float(dice[-1].mean() - empty[-1].mean())
        per_fold.append(
            {"fold": k, "rule": post.describe(), "gain": gain, "found": int((dice[-1][~empty[-1]] > 0).sum())}
        )
    score, all_empty = float(np.concatenate(dice).mean()), float(np.concatenate(empty).mean())
    return {"score": score, "all_empty": all_empty, "gain": score - all_empty, "folds": per_fold}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exps", nargs="+", help="experiments trained by make bench-real (models/bench-real/<exp>)")
    p.add_argument("--models", default=str(paths.MODELS / "bench-real"))
    p.add_argument("--processed", default=str(paths.PROCESSED / "bench-real" / "siim-real-bench"))
    args = p.parse_args()
    results = {}
    for name in args.exps:
        results[name] = crossfit(name, Path(args.models), Path(args.processed))
        gains = " / ".join(f"{f['gain']:+.4f}" for f in results[name]["folds"])
        print(
            f"{name}: cross-fitted {results[name]['score']:.4f}, all-empty {results[name]['all_empty']:.4f}, "
            f"gain {results[name]['gain']:+.4f} (per held-out fold {gains})",
            flush=True,
        )
    save("crossfit_search", results)


if __name__ == "__main__":
    main()
