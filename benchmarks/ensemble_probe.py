"""Run one measured step in a fresh process and print its peak memory and time as JSON.

    python ensemble_probe.py search   ROOT   # search.search on one experiment of ROOT's fake world
    python ensemble_probe.py ensemble ROOT   # ensemble.build over its three experiments
    python ensemble_probe.py predict  ROOT   # predict.predict_folder on its new DICOMs
    python ensemble_probe.py infer    ROOT   # infer.infer_test on the same images, prepared

ROOT is written by ``bench_post.fake_world``: a processed folder, three experiments with
finished folds and test maps, and a folder of DICOMs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb  # noqa: E402

from pneumothorax.io import config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.pipeline import ensemble, predict, search
from pneumothorax.predict import infer


def main(step: str, root: Path) -> None:
    spec = json.loads((root / "world.json").read_text())
    size, processed = spec["size"], ProcessedDir(root / "processed")
    cfg = config.from_yaml((root / "models" / "m0" / "fold0" / "config.yaml").read_text())
    started = time.perf_counter()
    if step == "search":
        search.search(cfg, ExperimentDir(root / "models" / "m0", size), processed, progress=False)
        count = spec["n_train"]
    elif step == "ensemble":
        members = [ensemble.Member(cfg, ExperimentDir(root / "models" / f"m{k}", size)) for k in range(3)]
        ensemble.build(members, ExperimentDir(root / "models" / "ens", size), processed, progress=False)
        count = spec["n_train"]
    elif step == "predict":
        predict.predict_folder(ExperimentDir(root / "models" / "m0", size), root / "new", root / "pred", "cpu", False)
        count = spec["n_new"]
    else:
        infer.infer_test(cfg, ExperimentDir(root / "models" / "m0", size), processed, "cpu", progress=False)
        count = spec["n_new"]
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    print(json.dumps({"step": step, "seconds": round(seconds, 2), "images": count, "peak_rss_mb": round(peak, 1)}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
