"""The Makefile as the DAG: planning one fold, and the whole pipeline end to end on a tiny world."""

from __future__ import annotations

import json
import shutil
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


def _planned(plan: str) -> dict[str, int]:
    """How many times each pipeline script appears in a ``make -n`` plan."""
    scripts = (
        "01_prepare",
        "02_folds",
        "03_train_classifier",
        "04_train_segmentation",
        "05_infer",
        "06_search",
        "07_submit",
    )
    return {s: sum(s in line for line in plan.splitlines()) for s in scripts}


def test_fold_out_of_range_fails_before_any_work(tmp_path):
    result = make("train", "EXP=tiny", "FOLD=9", f"MODELS_DIR={tmp_path}", dry=True, check=False)
    assert result.returncode != 0
    assert "FOLD=9 is not a fold of EXP=tiny, whose data.n_folds is 2: use FOLD=0 to FOLD=1" in result.stderr


@pytest.mark.slow
def test_todays_download_end_to_end(today, tmp_path):
    """`make prepare folds train infer submit DATA_DIR=<today's layout> EXP=tiny`, then what users change."""
    outputs = [
        f"MODELS_DIR={tmp_path / 'models'}",
        f"SUBMISSIONS_DIR={tmp_path / 'subs'}",
        f"PROCESSED={tmp_path / 'p'}",
    ]
    common = ["EXP=tiny", f"DATA_DIR={today}", "QUIET=1", *outputs]
    broken = sorted((today / "stage_2_images").glob("ID_*.dcm"))[1]
    broken.write_bytes(b"corrupt")  # a broken test image still gets its row
    make("prepare", "folds", "train", "infer", "submit", *common)
    sub = pd.read_csv(tmp_path / "subs" / "tiny.csv", dtype=str)
    sample = pd.read_csv(today / "stage_2_sample_submission.csv", dtype=str)
    assert list(sub.columns) == ["ImageId", "EncodedPixels"]
    assert sub["ImageId"].tolist() == sample["ImageId"].tolist()  # exactly the sample's ids, in its order
    assert sub.set_index("ImageId").loc[broken.stem, "EncodedPixels"] == "-1"
    for value in sub["EncodedPixels"]:
        rle.parse(value)
    assert make("-q", "prepare", "folds", "train", "infer", "submit", *common, check=False).returncode == 0

    # a new test folder: prepare, infer and submit rerun; nothing is retrained
    new_test = tmp_path / "new-test"
    new_test.mkdir()
    for path in sorted((today / "stage_2_images").glob("ID_*.dcm"))[2:6]:
        shutil.copy(path, new_test / path.name)
    swapped = [*common, f"TEST_DIR={new_test}", "SAMPLE_SUBMISSION=none"]
    plan = _planned(make("prepare", "folds", "train", "infer", "submit", *swapped, dry=True).stdout)
    assert plan == {
        "01_prepare": 1,
        "02_folds": 0,
        "03_train_classifier": 0,
        "04_train_segmentation": 0,
        "05_infer": 1,
        "06_search": 0,
        "07_submit": 1,
    }
    make("prepare", "infer", "submit", *swapped)
    sub = pd.read_csv(tmp_path / "subs" / "tiny.csv", dtype=str)
    assert sorted(sub["ImageId"]) == sorted(p.stem for p in new_test.glob("*.dcm"))

    # a training DICOM broken, then repaired: prepare fails naming it, then reads it again
    victim = sorted((today / "siim" / "dicom-images-test").rglob("*.dcm"))[3]  # an image with no second copy
    good = victim.read_bytes()
    victim.write_bytes(b"truncated")
    failed = make("prepare", *swapped, check=False)
    assert failed.returncode != 0 and str(victim) in failed.stderr and "unreadable training file" in failed.stderr
    victim.write_bytes(good)
    assert _planned(make("prepare", *swapped, dry=True).stdout)["01_prepare"] == 1
    make("prepare", *swapped)
    meta = pd.read_csv(tmp_path / "p" / "metadata.csv", dtype=str, keep_default_na=False)
    assert (meta["error"] == "").all()

    # a mistyped test folder is an error, not an empty submission
    typo = make("prepare", *common, f"TEST_DIR={today / 'stage_2_imgs'}", check=False)
    assert typo.returncode != 0 and "stage_2_imgs: test folder (TEST_DIR) does not exist" in typo.stderr


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
    make("synthetic", "SYNTH_TRAIN=60", "SYNTH_TEST=8", "SYNTH_SEED=4", "SYNTH_LAYOUT=stage1", *common)
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
