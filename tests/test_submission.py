"""Submission validation and scoring."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumothorax.io import rle
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.post import postprocess, submission
from pneumothorax.post.postprocess import PostProcess


def _frame(rows):
    return pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"])


def test_validation_rejects_bad_submissions(tmp_path):
    ok = _frame([("a", "-1"), ("b", "5 3")])
    submission.write(ok, tmp_path / "ok.csv", ["a", "b"])
    assert (tmp_path / "ok.csv").read_text().splitlines()[0] == "ImageId,EncodedPixels"
    cases = {
        "missing": (_frame([("a", "-1")]), "missing, e.g. b"),
        "duplicate": (_frame([("a", "-1"), ("b", "-1"), ("a", "1 1")]), "image a appears more than once"),
        "bad rle": (_frame([("a", "1 2 3"), ("b", "-1")]), "row 2 \\(image a\\): odd number"),
        "past image": (_frame([("a", f"{1024 * 1024} 1"), ("b", "-1")]), "past the 1024x1024"),
        "nan": (_frame([("a", None), ("b", "-1")]), "NaN"),
        "unknown": (_frame([("a", "-1"), ("b", "-1"), ("c", "-1")]), r"1 image id\(s\) not in the test set, e.g. c"),
    }
    for name, (frame, message) in cases.items():
        with pytest.raises(submission.SubmissionError, match=message):
            submission.write(frame, tmp_path / f"{name}.csv", ["a", "b"])
        assert not (tmp_path / f"{name}.csv").exists()
    empty = _frame([])
    with pytest.raises(submission.SubmissionError, match="refusing to write zero rows"):
        submission.write(empty, tmp_path / "empty.csv", [])
    assert not (tmp_path / "empty.csv").exists()


def test_score_by_hand(tmp_path):
    truth_a = np.zeros((1024, 1024), np.uint8)
    truth_a[:, :2] = 1  # 2048 pixels
    pred_a = np.zeros_like(truth_a)
    pred_a[:, :1] = 1  # 1024 pixels, all inside: Dice = 2*1024/3072 = 2/3
    pred_c = np.zeros_like(truth_a)
    pred_c[5, 5] = 1  # false positive on an empty image
    labels = tmp_path / "labels.csv"
    labels.write_text(f"ImageId, EncodedPixels\na, {rle.encode(truth_a)}\nb, -1\nc, -1\n")
    sub = tmp_path / "sub.csv"
    sub.write_text(f"ImageId,EncodedPixels\na,{rle.encode(pred_a)}\nb,-1\nc,{rle.encode(pred_c)}\n")
    result = submission.score(sub, labels)
    assert result["score"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert result["all_empty_score"] == pytest.approx(2 / 3)
    assert result["dice_positive"] == pytest.approx(2 / 3) and result["dice_negative"] == pytest.approx(0.5)
    assert result["false_positive_images"] == 1 and result["n_positive"] == 1 and result["positives_found"] == 1
    sub.write_text("ImageId,EncodedPixels\na,-1\n")
    with pytest.raises(submission.SubmissionError, match="missing"):
        submission.score(sub, labels)


def test_apply_decides_at_map_size_and_shapes_at_full_size():
    probs = np.zeros((64, 64), np.uint8)
    probs[10:30, 5:20] = 230
    post = PostProcess("b_r", 0.5, 1024, 0.5)
    full = post.apply(probs, gate_prob=0.9)
    assert full.shape == (1024, 1024)
    assert abs(int(full.sum()) - 20 * 15 * 256) < 0.05 * 20 * 15 * 256
    assert full[10 * 16 + 8, 5 * 16 + 8] and not full[5 * 16, 5 * 16]  # in the right place (rows, columns)
    assert not post.apply(probs, gate_prob=0.2).any()  # gated
    assert not replace(post, r_th=20 * 15 * 256 + 1).apply(probs, gate_prob=0.9).any()  # below R-TH
    assert replace(post, r_th=20 * 15 * 256 - 1).apply(probs, gate_prob=0.9).any()  # R-TH counts 1024 pixels


def test_empty_rule_predicts_nothing():
    probs = np.full((64, 64), 255, np.uint8)
    assert not PostProcess("empty").apply(probs, gate_prob=1.0).any()


def test_postprocess_round_trips_through_json(tmp_path):
    post = PostProcess("triplet", 0.5, 0.0, 0.3, 0, (0.75, 2048.0, 0.4))
    path = tmp_path / "postprocess.json"
    path.write_text(json.dumps({"postprocess": post.to_dict(), "score_search": 0.8}))
    loaded, scores = postprocess.load(path)
    assert loaded == post and scores == {"score_search": 0.8}
    with pytest.raises(postprocess.PostProcessError, match="unknown key 'bth'"):
        PostProcess.from_dict({"rule": "b_r", "bth": 0.5})
    with pytest.raises(postprocess.PostProcessError, match="needs triplet"):
        PostProcess("triplet")


def test_make_submission_writes_the_sample_order_and_minus_one_for_broken_images(tmp_path, monkeypatch):
    exp = ExperimentDir(tmp_path / "exp", 64)
    exp.test.mkdir(parents=True)
    maps = np.zeros((2, 64, 64), np.uint8)
    maps[0, 8:16, 8:16] = 250  # a pneumothorax on the first good image only
    maps[1, 30:40, 30:40] = 250  # the second: gated away
    np.save(exp.test_maps, maps)
    pd.DataFrame({"image_id": ["b", "c", "a"], "row": [0, -1, 1], "error": ["", "bad DICOM", ""]}).to_csv(
        exp.test_ids, index=False
    )
    pd.DataFrame({"image_id": ["b", "a"], "prob": [0.9, 0.1]}).to_csv(exp.test_gate, index=False)
    exp.postprocess.write_text(json.dumps({"postprocess": PostProcess("b_r", 0.5, 0, 0.5).to_dict()}))
    monkeypatch.setattr(submission.prepared, "expected_test_ids", lambda _: (["a", "b", "c"], Path("sample.csv")))
    frame = submission.make_submission(exp, ProcessedDir(tmp_path), tmp_path / "sub.csv", progress=False)
    assert list(frame["ImageId"]) == ["a", "b", "c"]  # the sample's order
    assert frame["EncodedPixels"].tolist()[0] == "-1" and frame["EncodedPixels"].tolist()[2] == "-1"
    mask = rle.decode(frame["EncodedPixels"].iloc[1])
    inside = mask[8 * 16 : 16 * 16, 8 * 16 : 16 * 16]
    assert inside.sum() == mask.sum() > 0.99 * 128 * 128  # the upsampled square (corners rounded), nothing else
    assert inside[8:-8, 8:-8].all() and inside[64].all() and inside[:, 64].all()  # full middle row and column
    assert pd.read_csv(tmp_path / "sub.csv").shape == (3, 2)
