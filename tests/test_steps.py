"""Pipeline steps on tiny inputs: the search with its full-resolution re-scoring, test inference, the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pneumothorax.data import datasets, prepared
from pneumothorax.io import config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.models import tta
from pneumothorax.pipeline import report, search
from pneumothorax.post.postprocess import PostProcess
from pneumothorax.predict import infer


@pytest.fixture()
def no_gate():
    return config.load("tiny", ["classifier.enabled=false", "postprocess.gate=[0.0]"])


def test_search_rescores_the_choice_at_full_resolution_against_the_rle(processed, exp, no_gate, finished_folds):
    finished_folds(no_gate, exp, processed, lambda masks: (masks > 0).astype(np.uint8) * 255)
    result = search.search(no_gate, exp, ProcessedDir(processed), progress=False)
    full = result["full_resolution"]
    assert full["n_images"] == result["n_images"] == 300
    assert full["all_empty_score"] == pytest.approx(result["all_empty_score"])
    # The truth at 64 px, upsampled, is close to the truth at 1024 px, not equal: that is what this measures.
    assert 0.9 < result["score_full_resolution"] < 1.0 == pytest.approx(result["score_search"])
    assert full["false_positive_images"] == 0
    saved = json.loads(exp.postprocess.read_text())
    assert PostProcess.from_dict(saved["postprocess"]).rule == "b_r" and exp.heatmap.exists() and exp.grid.exists()


def test_full_resolution_rescoring_sees_a_transposed_map(processed, exp, no_gate, finished_folds):
    """The search estimate is blind to the RLE's orientation; the re-scoring goes through the RLE, and is not."""
    finished_folds(no_gate, exp, processed, lambda masks: (masks > 0).transpose(0, 2, 1).astype(np.uint8) * 255)
    parts = list(search.oof_folds(no_gate, exp))
    right = search.rescore_full(parts, PostProcess("b_r", 0.5), prepared.labels_path(processed), progress=False)
    flipped = [search.FoldOOF(p.ids, np.ascontiguousarray(np.asarray(p.maps).transpose(0, 2, 1)), None) for p in parts]
    wrong = search.rescore_full(flipped, PostProcess("b_r", 0.5), prepared.labels_path(processed), progress=False)
    assert wrong["score"] > right["score"] + 0.05  # the transposed maps were the wrong ones
    assert wrong["dice_positive"] > 0.8 > right["dice_positive"]


def test_search_refuses_folds_trained_on_another_split(processed, exp, no_gate, finished_folds):
    finished_folds(no_gate, exp, processed, lambda masks: (masks > 0).astype(np.uint8) * 255)
    split = pd.read_csv(exp.folds)
    split.loc[split.index[:3], "fold"] = 1 - split.loc[split.index[:3], "fold"]
    split.to_csv(exp.folds, index=False)
    with pytest.raises(ValueError, match="fold0: trained on another split"):
        search.search(no_gate, exp, ProcessedDir(processed), progress=False)


def test_report_ranks_cases_by_their_dice(processed, exp, no_gate, finished_folds):
    def half_right(masks):
        maps = (masks > 0).astype(np.uint8) * 255
        maps[1::2] = 0  # every other image predicted empty
        return maps

    finished_folds(no_gate, exp, processed, half_right)
    search.search(no_gate, exp, ProcessedDir(processed), progress=False)
    cases = report._cases(no_gate, exp, ProcessedDir(processed), PostProcess("b_r", 0.5))
    assert cases[0][0] == 0.0 and cases[-1][0] > 0.8  # the emptied positives first, the right ones last
    assert [c[0] for c in cases] == sorted(c[0] for c in cases)
    for k in range(no_gate.data.n_folds):
        exp.segmenter(k).metrics.write_text("epoch,stage,kind,val_dice\n1,0,epoch,0.5\n2,1,epoch,0.6\n2,1,swa,0.7\n")
    out = report.build(no_gate, exp, ProcessedDir(processed))
    text = (out / "summary.md").read_text()
    saved = json.loads(exp.postprocess.read_text())
    assert f"**{saved['score_full_resolution']:.4f}**" in text and (out / "worst.png").exists()
    table = report._fold_table(no_gate, exp)
    assert table["last_val_dice"].tolist() == [0.6, 0.6]  # the final stage's last epoch, not stage 0's
    assert table["swa_val_dice"].tolist() == [0.7, 0.7] and table["best_val_dice"].tolist() == [0.7, 0.7]


class Ramp(torch.nn.Module):
    """A deterministic stand-in for a fold's segmenter."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift))

    def forward(self, x):
        return x[:, :1] * 4 - 2 + self.shift


def test_test_inference_averages_folds_and_keeps_broken_images(processed, tmp_path, monkeypatch):
    cfg = config.load("tiny", ["classifier.enabled=false", "infer.tta=[hflip]"])
    proc = tmp_path / "p"
    proc.mkdir()
    meta = pd.read_csv(processed / "metadata.csv", dtype={"image_id": str}, keep_default_na=False)
    test = meta[meta["split"] == "test"].sort_values("index").head(5).copy()
    test.loc[test.index[2], "error"] = "broken DICOM"
    test.to_csv(proc / "metadata.csv", index=False)
    images = np.asarray(prepared.load_cache(processed, "images", "test", 64))
    np.save(proc / "images_test_64.npy", images)
    folds_made = {k: Ramp(float(k)) for k in range(2)}
    monkeypatch.setattr(
        infer.trained, "load_segmenter", lambda cfg, run, which, device: folds_made[int(run.root.name[-1])]
    )
    exp = ExperimentDir(tmp_path / "exp", 64)
    infer.infer_test(cfg, exp, ProcessedDir(proc), device="cpu", progress=False)
    ids = pd.read_csv(exp.test_ids, keep_default_na=False)
    assert ids["image_id"].tolist() == test["image_id"].tolist()
    assert ids["row"].tolist() == [0, 1, -1, 2, 3] and ids["error"].iloc[2] == "broken DICOM"
    good = test[test["error"] == ""]["index"].to_numpy()
    x = datasets.model_input(torch.from_numpy(images[good]).unsqueeze(1), 1, torch.device("cpu"))
    expected = tta.predict_batch(list(folds_made.values()), x, ["hflip"])[:, 0]
    maps = np.load(exp.test_maps)
    assert maps.shape == (4, 64, 64)
    np.testing.assert_array_equal(maps, tta.to_uint8(expected))
    assert (pd.read_csv(exp.test_gate)["prob"] == 1.0).all()  # the gate is off
