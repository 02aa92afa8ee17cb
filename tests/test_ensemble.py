"""Ensembles: the blend is the weighted mean at one resolution, search picks a better blend, test maps follow."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from pneumothorax.data import prepared
from pneumothorax.io import config, freshness
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.pipeline import ensemble
from pneumothorax.post import submission


def _member(name, size, tmp_path, processed, finished_folds, maps_of):
    cfg = config.load(
        "tiny", ["classifier.enabled=false", "postprocess.gate=[0.0]", f"segmentation.stages.1.size={size}"]
    )
    cfg = cfg.__class__(**{**cfg.__dict__, "name": name})
    exp = ExperimentDir(tmp_path / "models" / name, size)
    exp.root.mkdir(parents=True)
    shutil.copy(processed / "folds.csv", exp.folds)
    finished_folds(cfg, exp, processed, maps_of, size)
    meta = pd.read_csv(processed / "metadata.csv", dtype={"image_id": str}, keep_default_na=False)
    test = meta[meta["split"] == "test"].sort_values("index").reset_index(drop=True)
    exp.test.mkdir()
    rng = np.random.default_rng(size)
    np.save(exp.test_maps, rng.integers(0, 256, (len(test), size, size), dtype=np.uint8))
    pd.DataFrame({"image_id": test["image_id"], "row": np.arange(len(test)), "error": ""}).to_csv(
        exp.test_ids, index=False
    )
    pd.DataFrame({"image_id": test["image_id"], "prob": 1.0}).to_csv(exp.test_gate, index=False)
    return ensemble.Member(cfg, exp)


def test_an_ensemble_blends_at_one_size_and_searches_its_weights(processed, tmp_path, finished_folds):
    rng = np.random.default_rng(0)
    good = _member("good", 64, tmp_path, processed, finished_folds, lambda m: ((m > 0) * 200).astype(np.uint8))
    noisy = _member(
        "noisy", 32, tmp_path, processed, finished_folds, lambda m: rng.integers(0, 256, m.shape, dtype=np.uint8)
    )
    out = ExperimentDir(tmp_path / "models" / "ens", 64)
    record = ensemble.build([good, noisy], out, ProcessedDir(processed), "equal", progress=False)
    assert record["weights"] == [0.5, 0.5] and record["size"] == 64
    ids = pd.read_csv(out.blended_ids, dtype={"image_id": str})
    blended = np.load(out.blended_oof)
    maps_a, maps_b = ensemble.oof_maps(good)[0], ensemble.oof_maps(noisy)[0]
    first = ids["image_id"].iloc[0]
    a = maps_a.read([first], 64)[0]
    b = cv2.resize(maps_b.read([first], 32)[0], (64, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(blended[0] / 255.0, (a + b) / 2, atol=1 / 255 + 1e-6)  # the mean, at the largest size
    assert sorted(ids["image_id"]) == sorted(ensemble.oof_maps(good)[1]["image_id"])

    searched = ensemble.build([good, noisy], out, ProcessedDir(processed), "search", progress=False)
    assert searched["weights"][0] > searched["weights"][1]  # the good member weighs more
    assert searched["score_search"] >= record["score_search"] - 1e-12
    tried = {tuple(t["weights"]): t["score_search"] for t in searched["weights_tried"]}
    assert searched["score_search"] == pytest.approx(max(tried.values())) and (1.0, 0.0) in tried

    saved = json.loads(out.postprocess.read_text())
    assert saved["full_resolution"]["n_images"] == 300 and saved["score_full_resolution"] > 0.8
    test_ids = pd.read_csv(out.test_ids, dtype={"image_id": str}, keep_default_na=False)
    expected, _ = prepared.expected_test_ids(processed)
    assert sorted(test_ids["image_id"]) == sorted(expected) and np.load(out.test_maps).shape == (len(test_ids), 64, 64)
    frame = submission.make_submission(out, ProcessedDir(processed), tmp_path / "ens.csv", progress=False)
    assert len(frame) == len(expected)
    summary = ensemble.report(searched, out, None).read_text()
    assert "good" in summary and "noisy" in summary and f"{searched['score_full_resolution']:.4f}"[:5] in summary


def test_members_must_cover_the_same_images(processed, tmp_path, finished_folds):
    good = _member("a", 64, tmp_path, processed, finished_folds, lambda m: ((m > 0) * 200).astype(np.uint8))
    other = _member("b", 64, tmp_path, processed, finished_folds, lambda m: ((m > 0) * 200).astype(np.uint8))
    ids = pd.read_csv(other.exp.test_ids)
    ids.iloc[:-1].to_csv(other.exp.test_ids, index=False)
    with pytest.raises(ValueError, match="b's test images and a's differ"):
        ensemble.build([good, other], ExperimentDir(tmp_path / "ens", 64), ProcessedDir(processed), progress=False)


def test_an_ensemble_leaves_one_fold_of_its_members_shared_split_out(processed, tmp_path, finished_folds):
    """Each fold's images scored with the rule chosen on the others: two perfect members make every fold's Dice
    1 (maps and truth rows matched, fold by fold); members of another split are refused by name."""
    perfect = [
        _member(name, 64, tmp_path, processed, finished_folds, lambda m: ((m > 0) * 200).astype(np.uint8))
        for name in ("a", "b")
    ]
    out = ensemble.out_dir(perfect, tmp_path / "models", "ens")
    ensemble.build(perfect, out, ProcessedDir(processed), "equal", progress=False)
    result = ensemble.crossfit(perfect, out, ProcessedDir(processed))
    split = pd.read_csv(processed / "folds.csv")
    assert [f["part"] for f in result["folds"]] == list(range(split["fold"].nunique()))
    assert result["score"] == pytest.approx(1.0) and result["all_empty"] == pytest.approx(
        1 - split["has_pneumothorax"].mean()
    )
    assert sum(f["found"] for f in result["folds"]) == int(split["has_pneumothorax"].sum())
    moved = split.assign(fold=(split["fold"] + 1) % split["fold"].nunique())
    moved.to_csv(perfect[1].exp.folds, index=False)
    with pytest.raises(ValueError, match="b and a were trained on other splits"):
        ensemble.crossfit(perfect, out, ProcessedDir(processed))


def test_an_ensemble_of_members_of_two_sizes_is_cross_fitted_at_the_larger(processed, tmp_path, finished_folds):
    """The smaller member first: the ensemble's folder, maps and truth are at the larger size (``out_dir``), and
    two near-perfect members leave every fold's positives found."""
    members = [
        _member(name, size, tmp_path, processed, finished_folds, lambda m: ((m > 0) * 200).astype(np.uint8))
        for name, size in (("small", 32), ("large", 64))
    ]
    out = ensemble.out_dir(members, tmp_path / "models", "ens")
    assert out.final_size == 64
    ensemble.build(members, out, ProcessedDir(processed), "equal", progress=False)
    assert np.load(out.blended_oof, mmap_mode="r").shape[1:] == (64, 64)
    result = ensemble.crossfit(members, out, ProcessedDir(processed))
    split = pd.read_csv(processed / "folds.csv")
    assert result["score"] > 0.95 and sum(f["found"] for f in result["folds"]) == int(split["has_pneumothorax"].sum())


def test_another_member_list_or_weight_mode_rebuilds_an_ensemble_and_a_revert_does_not(tmp_path):
    """An ensemble is stale when ``ensemble.json`` was built from other members or another WEIGHTS; set back
    (after a `make -n` of another mode, say), it is up to date again: nothing was written meanwhile."""
    exp = ExperimentDir(tmp_path / "ens1")
    exp.root.mkdir()
    assert not freshness.ensemble_is_stale(exp, ["a", "b"], "equal")  # not built yet: Make builds it anyway
    exp.ensemble.write_text(
        json.dumps({"members": [{"experiment": "a"}, {"experiment": "b"}], "weights_mode": "equal"})
    )
    assert not freshness.ensemble_is_stale(exp, ["a", "b"], "equal")  # as built: up to date
    assert freshness.ensemble_is_stale(exp, ["a", "b"], "search")  # another weight mode: rebuilt
    assert freshness.ensemble_is_stale(exp, ["a", "b", "c"], "equal")  # another member: rebuilt
    assert freshness.ensemble_is_stale(exp, ["b", "a"], "equal")  # another order: other weights, rebuilt
    assert sorted(p.name for p in exp.root.iterdir()) == ["ensemble.json"]
