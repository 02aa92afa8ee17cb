"""Submission validation and scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pneumothorax import rle, submission


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
    assert result["false_positive_images"] == 1 and result["n_positive"] == 1
    sub.write_text("ImageId,EncodedPixels\na,-1\n")
    with pytest.raises(submission.SubmissionError, match="missing"):
        submission.score(sub, labels)


def test_final_mask_gate_and_resize():
    probs = np.zeros((64, 64), np.uint8)
    probs[10:30, 5:20] = 230
    post = {"rule": "b_r", "b_th": 0.5, "r_th": 1024, "gate": 0.5, "min_component": 0}
    full = submission.final_mask(probs, post, gate_prob=0.9)
    assert full.shape == (1024, 1024)
    assert abs(int(full.sum()) - 20 * 15 * 256) < 0.05 * 20 * 15 * 256
    assert not submission.final_mask(probs, post, gate_prob=0.2).any()  # gated
    assert not submission.final_mask(probs, {**post, "r_th": 10**6}, gate_prob=0.9).any()  # removed


def test_empty_rule_predicts_nothing():
    probs = np.full((64, 64), 255, np.uint8)
    post = {"rule": "empty", "b_th": 0.5, "r_th": 0, "gate": 0.0, "min_component": 0}
    assert not submission.final_mask(probs, post, gate_prob=1.0).any()
