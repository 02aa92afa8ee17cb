"""The Makefile as the DAG: planning one fold, and the whole pipeline end to end on a tiny world."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

from pneumothorax import paths, rle


def make(*args: str, check: bool = True, dry: bool = False) -> subprocess.CompletedProcess:
    cmd = ["make", "--no-print-directory", "-C", str(paths.ROOT), *(["-n"] if dry else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_make_plans_exactly_one_fold(tmp_path):
    plan = make(
        "train",
        "EXP=demo",
        "FOLD=2",
        f"MODELS_DIR={tmp_path}",
        f"PROCESSED={tmp_path}/p",
        "DATA_DIR=/nonexistent",
        dry=True,
    ).stdout
    seg = [line for line in plan.splitlines() if "04_train_segmentation.py" in line]
    cls = [line for line in plan.splitlines() if "03_train_classifier.py" in line]
    assert len(seg) == 1 and "--fold 2" in seg[0]
    assert len(cls) == 1 and "--fold 2" in cls[0]
    every = make("train", "EXP=demo", f"MODELS_DIR={tmp_path}", f"PROCESSED={tmp_path}/p", dry=True).stdout
    assert sum("04_train_segmentation.py" in line for line in every.splitlines()) == 5


def test_make_help_lists_targets():
    out = make("help").stdout
    for target in ("demo", "prepare", "folds", "train", "infer", "search", "submit", "score", "report", "test"):
        assert target in out


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    world, models_dir, subs, processed = tmp_path / "world", tmp_path / "models", tmp_path / "subs", tmp_path / "p"
    common = [
        "EXP=tiny",
        f"DATA_DIR={world}",
        f"MODELS_DIR={models_dir}",
        f"SUBMISSIONS_DIR={subs}",
        f"PROCESSED={processed}",
        "QUIET=1",
    ]
    make("synthetic", "SYNTH_TRAIN=60", "SYNTH_TEST=8", "SYNTH_SEED=4", *common)
    broken = sorted((world / "dicom-images-test").rglob("*.dcm"))[2]
    broken.write_bytes(b"corrupt")
    make("prepare", "train", "infer", "submit", "score", "report", *common)
    sub = pd.read_csv(subs / "tiny.csv", dtype=str)
    assert list(sub.columns) == ["ImageId", "EncodedPixels"] and len(sub) == 8
    assert sub.set_index("ImageId").loc[broken.stem, "EncodedPixels"] == "-1"
    for value in sub["EncodedPixels"]:
        rle.parse(value)
    score = json.loads((models_dir / "tiny" / "score.json").read_text())
    assert score["n_images"] == 8 and 0 <= score["score"] <= 1
    post = json.loads((models_dir / "tiny" / "thresholds.json").read_text())
    assert post["score"] >= post["no_postprocess_score"] - 1e-12 and post["score"] >= post["all_empty_score"] - 1e-12
    for name in ("grid.csv", "heatmap.png", "report/summary.md", "test/probs.npy", "classifier/fold1/metrics.json"):
        assert (models_dir / "tiny" / name).exists(), name
    # a finished run is up to date: nothing to do
    assert make("-q", "prepare", "train", "infer", "submit", "score", "report", *common, check=False).returncode == 0
    # one fold out of date reruns that fold and what depends on it, nothing else
    (models_dir / "tiny" / "fold1" / "model.pt").unlink()
    plan = make("submit", *common, dry=True).stdout
    assert sum("04_train_segmentation.py" in line for line in plan.splitlines()) == 1
    assert "--fold 1" in plan and "03_train_classifier.py" not in plan and "05_infer.py" in plan
