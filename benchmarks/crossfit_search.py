"""How much of a searched OOF gain is the search choosing on the images it is scored on: leave one fold out
(``make bench-real`` writes the same as ``oof_crossfit``; this re-reads runs already trained).

For each fold of an experiment trained by ``make bench-real`` (its OOF maps and gate probabilities under
``models/bench-real/<exp>``), the post-processing search of ``make search`` runs on the other folds' OOF maps
only, and its choice is scored on the held-out fold at the maps' resolution (the search's own metric: mean
per-image Dice). The pooled cross-fitted score against all-empty is an estimate of the gain that the in-sample
``oof_gain_over_all_empty`` of ``bench_real.json`` overstates. Writes ``benchmarks/results/crossfit_search.json``.

    .venv/bin/python benchmarks/crossfit_search.py real_cpu real_c19

An ensemble built there by ``make ensemble`` (its ``ensemble.json`` names the members) is cross-fitted on its
blended maps, its folds the members' shared split (members of other splits are refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from pneumothorax.io import config, paths  # noqa: E402
from pneumothorax.io.config import PostprocessConfig  # noqa: E402
from pneumothorax.io.paths import ExperimentDir, ProcessedDir  # noqa: E402
from pneumothorax.pipeline import ensemble, search  # noqa: E402
from pneumothorax.post import exact_search  # noqa: E402
from pneumothorax.post.exact_search import OOFPart  # noqa: E402


def oof_parts(name: str, models: Path, processed: ProcessedDir) -> tuple[PostprocessConfig, list[OOFPart]]:
    """What the search reads of one experiment (per fold its OOF maps, truth and gate probabilities) or of an
    ensemble (a folder with ``ensemble.json``: its blended maps on the members' shared split), with the grid."""
    record = models / name / "ensemble.json"
    if not record.exists():
        cfg = config.load(name)
        return cfg.postprocess, search.oof_parts(cfg, ExperimentDir(models / name), processed)
    members = [ensemble.member(config.load(m["experiment"]), models) for m in json.loads(record.read_text())["members"]]
    return members[0].cfg.postprocess, ensemble.oof_parts(members, ensemble.out_dir(members, models, name), processed)


def crossfit_one(name: str, models: Path, processed: ProcessedDir) -> dict:
    """One experiment's cross-fitted search, or an ensemble's."""
    grid, parts = oof_parts(name, models, processed)
    return exact_search.crossfit_oof(parts, grid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "exps",
        nargs="+",
        help="experiments trained by make bench-real, or ensembles of them (models/bench-real/<name>)",
    )
    p.add_argument("--models", default=str(paths.MODELS / "bench-real"))
    p.add_argument("--processed", default=str(paths.PROCESSED / "bench-real" / "siim-real-bench"))
    args = p.parse_args()
    results = {}
    for name in args.exps:
        results[name] = crossfit_one(name, Path(args.models), ProcessedDir(args.processed))
        gains = " / ".join(f"{f['gain']:+.4f}" for f in results[name]["folds"])
        print(
            f"{name}: cross-fitted {results[name]['score']:.4f}, all-empty {results[name]['all_empty']:.4f}, "
            f"gain {results[name]['gain']:+.4f} (per held-out fold {gains})",
            flush=True,
        )
    save("crossfit_search", results)


if __name__ == "__main__":
    main()
