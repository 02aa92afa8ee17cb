"""The leaderboard: every searched experiment and ensemble, sorted by the full-resolution OOF score."""

from __future__ import annotations

import json

import pandas as pd

from pneumothorax.io import config
from pneumothorax.io.paths import ExperimentDir
from pneumothorax.pipeline import leaderboard
from pneumothorax.post.postprocess import PostProcess


def _experiment(models, name, score, encoder, seconds):
    cfg = config.load("tiny", [f"segmentation.encoder={encoder}"])
    exp = ExperimentDir(models / name, 64)
    for k in range(2):
        run = exp.segmenter(k)
        run.root.mkdir(parents=True)
        run.config.write_text(config.dump(cfg))
        pd.DataFrame(
            {"epoch": [1, 2], "stage": [0, 1], "kind": "epoch", "val_dice": [0.9, 0.5 + k / 10], "seconds": seconds}
        ).to_csv(run.metrics, index=False)
    post = PostProcess("b_r", 0.4, 1024, 0.0).to_dict()
    exp.postprocess.write_text(
        json.dumps({"postprocess": post, "no_postprocess_score": 0.7, "score_full_resolution": score})
    )
    return exp


def test_leaderboard_sorts_by_oof_and_reads_every_column(tmp_path):
    models = tmp_path / "models"
    _experiment(models, "a", 0.81, "resnet18", 1800)
    b = _experiment(models, "b", 0.86, "resnet34", 900)
    b.score.write_text(json.dumps({"score": 0.84}))
    ens = ExperimentDir(models / "ens", 64)
    ens.root.mkdir()
    ens.ensemble.write_text(
        json.dumps({"members": [{"experiment": "a"}, {"experiment": "b"}], "weights": [0.25, 0.75], "size": 64})
    )
    ens.postprocess.write_text(
        json.dumps(
            {"postprocess": PostProcess().to_dict(), "no_postprocess_score": 0.75, "score_full_resolution": 0.87}
        )
    )
    (models / "unsearched").mkdir()  # no postprocess.json: left out
    table = leaderboard.build(models)
    assert table["name"].tolist() == ["ens", "b", "a"]
    b_row = table.set_index("name").loc["b"]
    assert b_row["fold_val_dice"] == "0.5000 0.6000"  # the final stage's best epoch, per fold
    assert b_row["train_hours"] == 1.0 and b_row["test"] == 0.84 and "resnet34" in b_row["model"]
    assert b_row["sizes"] == "32 -> 64" and "B-TH 0.4, R-TH 1024" in b_row["postprocess"]
    assert table.set_index("name").loc["ens", "model"] == "a x0.25, b x0.75"
    md = (models / "leaderboard.md").read_text()
    assert md.index("| ens |") < md.index("| b |") < md.index("| a |")
