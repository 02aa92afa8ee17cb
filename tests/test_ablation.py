"""`make ablation`: every variant runs, the inference variants reuse the full recipe's folds, the table adds up."""

from __future__ import annotations

import json
import re
import subprocess

import pandas as pd
import pytest

from pneumothorax.io import config, paths
from pneumothorax.pipeline.ablation import INFERENCE, TRAINING, training_overrides


def test_training_variants_change_what_they_say():
    demo = config.load("demo")
    one = training_overrides(demo, "one_stage")["segmentation"]["stages"]
    assert (
        len(one) == 1 and one[0]["size"] == 128 and one[0]["epochs"] == sum(s.epochs for s in demo.segmentation.stages)
    )
    assert all(s["swa_epochs"] == 0 for s in training_overrides(demo, "no_swa")["segmentation"]["stages"])
    no_sampler = training_overrides(demo, "no_sampler")["segmentation"]["stages"]
    assert all(s["positive_rate"] is None and s["positive_rate_end"] is None for s in no_sampler)


@pytest.mark.make
def test_ablation_of_the_tiny_recipe(tmp_path):
    models = tmp_path / "models"
    command = [
        "make",
        "--no-print-directory",
        "-C",
        str(paths.ROOT),
        "ablation",
        "EXP=tiny",
        f"MODELS_DIR={models}",
        "ABLATION_SEEDS=3 4",
        "ABLATION_JOBS=2",
        "SYNTH_TRAIN=60",
        "SYNTH_TEST=8",
        "QUIET=1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    out = models / "tiny" / "ablation"
    summary = pd.read_csv(out / "ablation.csv").set_index("variant")
    assert list(summary.index) == [*TRAINING, *INFERENCE] and (summary["runs"] == 2).all()
    assert summary.loc["full", "d_oof"] == 0 and summary.loc["full", "d_test"] == 0
    world = out / "world0" / "models"
    full, no_rth = world / "tiny-full-s3", world / "tiny-full-s3-no_rth"
    assert (full / "fold0" / "model.pt").stat().st_ino == (no_rth / "fold0" / "model.pt").stat().st_ino  # reused
    # the gate trains once per seed (2 folds, 2 seeds): the training variants share the full recipe's
    assert result.stdout.count("03_train_classifier.py") == 4
    # parallel runs' lines interleave: each carries its run
    gates = re.findall(r"^\[world \d+ seed (\d)\] .*03_train_classifier\.py", result.stdout, re.MULTILINE)
    assert sorted(gates) == ["3", "3", "4", "4"]
    # the world is prepared once up front (as tiny-full-s3); tiny-full-s4's prepare finds it done, and the other
    # variants carry their full recipe's record of it: prepare is up to date for them
    assert result.stdout.count("01_prepare.py") == 2
    # ABLATION_JOBS=2: seed 4 started (its steps' records) before seed 3's last variant had trained
    seed4_started = min(p.stat().st_mtime for p in (world / "tiny-full-s4" / "made").glob("*.json"))
    assert seed4_started < (world / "tiny-no_sampler-s3" / "fold0" / "model.pt").stat().st_mtime
    for variant in ("no_swa", "one_stage", "no_sampler"):
        gate = world / f"tiny-{variant}-s3" / "classifier" / "fold1" / "model.pt"
        assert gate.stat().st_ino == (full / "classifier" / "fold1" / "model.pt").stat().st_ino
    assert json.loads((no_rth / "postprocess.json").read_text())["postprocess"]["r_th"] == 0
    assert json.loads((world / "tiny-full-s3-bth_0.5" / "postprocess.json").read_text())["postprocess"]["b_th"] == 0.5
    one_stage = config.from_yaml((world / "tiny-one_stage-s3" / "fold0" / "config.yaml").read_text())
    assert [s.size for s in one_stage.segmentation.stages] == [64] and one_stage.seed == 3
    no_tta = world / "tiny-full-s3-no_tta"
    assert (no_tta / "oof" / "fold0.npy").stat().st_ino != (full / "oof" / "fold0.npy").stat().st_ino  # re-predicted
    assert (no_rth / "oof" / "fold0.npy").stat().st_ino == (full / "oof" / "fold0.npy").stat().st_ino  # reused
    assert "| no_gate |" in (out / "ablation.md").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # a finished ablation redoes nothing
    assert again.returncode == 0 and "_train_" not in again.stdout and "06_infer" not in again.stdout
