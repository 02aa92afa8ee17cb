"""The exact grid search equals brute force; the triplet rule and apply() agree with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pneumothorax.io import config, metric
from pneumothorax.post import exact_search, postprocess
from pneumothorax.post.postprocess import PostProcess

BASE = config.load("base").postprocess  # the shipped grid; tests replace parts of it


def _inputs(dtype, seed=0, n=30, size=24):
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < 0.15
    masks[:8] = False  # empty truths
    if dtype == np.uint8:
        probs = (rng.random((n, size, size)) ** 2 * 256).clip(0, 255).astype(np.uint8)
        probs[8:12] = 0  # empty predictions
        probs[12] = 255
    else:
        probs = (rng.random((n, size, size)) ** 2).astype(dtype)
        probs[8:12] = 0.0
        probs[12, 0, 0] = dtype(0.3)  # exactly on a threshold
    return probs, masks


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_grid_search_equals_brute_force(dtype):
    probs, masks = _inputs(dtype)
    b_th = [0.3, 0.1, 0.5, 0.5, 51 / 255, 0.9, 0.0, 0.999]
    r_th = [0, 500, 1024, 4096, 60_000, 10**7]
    fast = exact_search.grid_search(probs, masks, b_th, r_th)
    brute = exact_search.grid_search_brute(probs, masks, b_th, r_th)
    assert fast.shape == (len(b_th), len(r_th))
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-12)
    # R-TH beyond any area empties every image: the all-empty score
    assert np.allclose(fast[:, -1], (masks.reshape(len(masks), -1).sum(1) == 0).mean())


def test_chunking_does_not_change_counts():
    probs, masks = _inputs(np.uint8, seed=3, n=21)
    a = exact_search.threshold_counts(probs, masks, [0.2, 0.6], chunk=4)
    b = exact_search.threshold_counts(probs, masks, [0.2, 0.6], chunk=256)
    assert (a.pred == b.pred).all() and (a.inter == b.inter).all() and (a.true_area == b.true_area).all()


def test_triplet_and_gate_match_apply():
    probs, masks = _inputs(np.uint8, seed=1)
    tops, areas, bottoms = [0.6, 0.8], [0, 2048, 20_000], [0.3, 0.5]
    counts = exact_search.threshold_counts(probs, masks, sorted({*tops, *bottoms}))
    gate_probs = np.linspace(0, 1, len(probs))
    keep = gate_probs >= 0.4
    grid = exact_search.triplet_grid(counts, tops, areas, bottoms, keep)
    for a, top in enumerate(tops):
        for b, area in enumerate(areas):
            for c, bottom in enumerate(bottoms):
                preds = np.stack(
                    [
                        PostProcess("triplet", gate=0.4, triplet=(top, area, bottom)).decide(p, g)
                        for p, g in zip(probs, gate_probs, strict=True)
                    ]
                )
                assert grid[a, b, c] == pytest.approx(metric.mean_dice(preds, masks), abs=1e-12)
    gated = exact_search.gated_grid(exact_search.threshold_counts(probs, masks, [0.5]), gate_probs, [0.0, 0.4], [1024])
    rule = PostProcess("b_r", 0.5, 1024, 0.4)
    preds = np.stack([rule.decide(p, g) for p, g in zip(probs, gate_probs, strict=True)])
    assert gated[1, 0, 0] == pytest.approx(metric.mean_dice(preds, masks), abs=1e-12)
    assert gated[0, 0, 0] == pytest.approx(exact_search.grid_search(probs, masks, [0.5], [1024])[0, 0], abs=1e-12)


def test_remove_small_components():
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True  # 4 pixels
    mask[10:16, 10:16] = True  # 36 pixels
    out = postprocess.remove_small(mask, 10)
    assert out.sum() == 36 and not out[1, 1]


def _brute_best(parts, b_values, r_values, gates, blends=(0.0,), tops=(0.0,)):
    """The best mean Dice over the grid by thresholding every map with PostProcess.decide (slow, exact)."""
    best = (-1.0, None)
    for blend, top, gate in ((w, t, g) for w in blends for t in (tops if w else tops[:1]) for g in gates):
        for b in b_values:
            for r in r_values:
                rule = PostProcess("b_r", b, r, gate, gate_blend=blend, gate_top=top if blend else 0.0)
                dices = [
                    metric.dice_per_image(rule.decide(p, g)[None], m[None])[0]
                    for part in parts
                    for p, m, g in zip(part.probs, part.masks, part.gate, strict=True)
                ]
                if np.mean(dices) > best[0] + 1e-12:
                    best = (float(np.mean(dices)), rule)
    return best


def test_search_returns_the_rule_that_brute_force_finds_best():
    probs, masks = _inputs(np.uint8, seed=5)
    gate = np.random.default_rng(5).random(len(probs))
    gate[masks.reshape(len(masks), -1).any(axis=1)] += 0.5  # an informative gate
    half = len(probs) // 2
    parts = [
        exact_search.OOFPart(probs[:half], masks[:half], gate[:half]),
        exact_search.OOFPart(probs[half:], masks[half:], gate[half:]),
    ]
    pp = replace(BASE, b_th=config_grid(0.2, 0.8, 0.1), r_th=(0, 512, 4096), gate=(0.0, 0.5, 0.9))
    found = exact_search.search_oof(parts, pp)
    score, rule = _brute_best(parts, pp.b_th.values(), pp.r_th, pp.gate)
    assert found.score == pytest.approx(score, abs=1e-12)
    assert (found.post.b_th, found.post.r_th, found.post.gate) == (rule.b_th, rule.r_th, rule.gate)
    assert found.all_empty_score == pytest.approx((~masks.reshape(len(masks), -1).any(axis=1)).mean())
    assert found.grid.shape == (7, 3)


def _peaked_maps(seed=3, n=40, size=24):
    """Maps with a bright patch on every image: on the truth for positives, elsewhere and dimmer for negatives
    (B-TH and R-TH cannot tell them apart; the map's peak can), and a classifier probability that is right on
    only half of the positives: the segmenter's confidence has something to add to the gate."""
    rng = np.random.default_rng(seed)
    masks, probs = np.zeros((n, size, size), dtype=bool), (rng.random((n, size, size)) * 100).astype(np.uint8)
    positive = np.arange(n) % 3 == 0
    for i in range(n):
        r, c = rng.integers(2, size - 8, 2)
        low, high = (235, 256) if positive[i] else (150, 221)
        probs[i, r : r + 6, c : c + 6] = rng.integers(low, high, (6, 6))
        masks[i, r : r + 6, c : c + 6] = positive[i]
    gate = rng.random(n) * 0.6
    gate[np.flatnonzero(positive)[::2]] += 0.4
    return probs, masks, gate


def test_a_blended_gate_is_searched_exactly_and_decide_replays_it():
    probs, masks, gate = _peaked_maps()
    half = len(probs) // 2
    parts = [exact_search.OOFPart(probs[s], masks[s], gate[s]) for s in (slice(0, half), slice(half, None))]
    pp = replace(BASE, b_th=config_grid(0.5, 0.7, 0.1), r_th=(0, 4096), gate=(0.0, 0.5, 0.7), gate_blend=(0.0, 0.5))
    found = exact_search.search_oof(parts, pp)
    score, rule = _brute_best(parts, pp.b_th.values(), pp.r_th, pp.gate, pp.gate_blend)
    assert found.score == pytest.approx(score, abs=1e-12) and found.post == rule
    assert found.post.gate_blend == 0.5 and found.post.gate > 0  # the blend beats the classifier alone here
    alone = exact_search.search_oof(parts, replace(pp, gate_blend=(0.0,)))
    assert alone.post.gate_blend == 0.0 and alone.score < found.score
    for part, auc in zip(parts, found.gate_auc, strict=True):  # each fold's AUC of the chosen gate score
        score_of = postprocess.gate_score(part.gate, postprocess.peak(part.probs), 0.5)
        assert auc == pytest.approx(metric.roc_auc(part.masks.reshape(len(part.masks), -1).any(axis=1), score_of))
    # an image the classifier alone would empty is kept by the blend when its peak is high, exactly at the line
    image = np.zeros((8, 8), np.uint8)
    image[2:5, 2:5] = 255  # peak 1.0
    blended = PostProcess("b_r", 0.5, 0.0, gate=0.6, gate_blend=0.5)
    assert blended.decide(image, 0.2).sum() == 9 and not blended.decide(image, 0.19).any()  # 0.5*0.2 + 0.5 = 0.6
    assert not replace(blended, gate_blend=0.0).decide(image, 0.2).any()


def test_a_saved_decision_keeps_its_gate_blend_and_an_older_one_reads_as_the_classifier_alone():
    rule = PostProcess("b_r", 0.4, 1024.0, 0.5, gate_blend=0.25, gate_top=0.01)
    assert PostProcess.from_dict(rule.to_dict()) == rule
    older = {k: v for k, v in rule.to_dict().items() if k not in ("gate_blend", "gate_top")}
    assert PostProcess.from_dict(older).gate_blend == 0.0 and PostProcess.from_dict(older).gate_top == 0.0
    with pytest.raises(postprocess.PostProcessError, match="gate_blend 1.5"):
        PostProcess(gate_blend=1.5)
    with pytest.raises(postprocess.PostProcessError, match="gate_top 1.0"):
        PostProcess(gate_top=1.0)
    with pytest.raises(config.ConfigError, match=r"postprocess.gate_blend: \[0.5, 1.2\]"):
        config.load("tiny", ["postprocess.gate_blend=[0.5, 1.2]"])
    with pytest.raises(config.ConfigError, match=r"postprocess.gate_top: \[0.0, -0.1\]"):
        config.load("tiny", ["postprocess.gate_top=[0.0, -0.1]"])


def test_a_peak_over_the_top_fraction_is_exact_alone_in_a_batch_and_on_floats():
    rng = np.random.default_rng(0)
    ramp = rng.permutation(np.arange(100, dtype=np.uint8) * 2).reshape(10, 10)  # 0, 2, ..., 198
    ties = np.full((10, 10), 100, np.uint8)
    ties.flat[[3, 50, 97]] = 255  # three at 255: the top 5 take two from the next bin
    maps = np.stack([ramp, ties, np.zeros((10, 10), np.uint8)])
    assert postprocess.peak(maps).tolist() == [198 / 255, 1.0, 0.0]
    top10 = postprocess.peak(maps, 0.1)  # the 10 highest of 100 pixels
    assert top10[0] == pytest.approx(189 / 255, abs=1e-15)  # mean of 180 ... 198
    assert postprocess.peak(maps, 0.05)[1] == pytest.approx((3 * 255 + 2 * 100) / 5 / 255, abs=1e-15)
    alone = [postprocess.peak(m[None], 0.1)[0] for m in maps]
    assert alone == top10.tolist()  # the same floats alone and in a batch
    floats = postprocess.peak(maps.astype(np.float64) / 255, 0.05)
    assert floats == pytest.approx(postprocess.peak(maps, 0.05), abs=1e-12)
    both = postprocess.peaks(maps, [0.0, 0.05, 0.1])
    assert both[0.1].tolist() == top10.tolist() and both[0.0].tolist() == postprocess.peak(maps).tolist()


def _hot_pixel_maps(seed=4, n=36, size=24):
    """Positives with a broad lesion of p ~0.8 on their truth, negatives with one hot pixel of p 1 in dim noise,
    and a classifier that is right on only half of the positives: the map's highest pixel ranks the negatives
    first, the mean of its top pixels ranks the positives first."""
    rng = np.random.default_rng(seed)
    masks, probs = np.zeros((n, size, size), dtype=bool), (rng.random((n, size, size)) * 60).astype(np.uint8)
    positive = np.arange(n) % 3 == 0
    for i in range(n):
        r, c = rng.integers(2, size - 8, 2)
        if positive[i]:
            probs[i, r : r + 6, c : c + 6] = rng.integers(195, 215, (6, 6))
            masks[i, r : r + 6, c : c + 6] = True
        else:
            probs[i, r, c] = 255
    gate = rng.random(n) * 0.6
    gate[np.flatnonzero(positive)[::2]] += 0.4
    return probs, masks, gate


def test_a_gate_on_the_mean_of_the_top_pixels_is_searched_exactly_and_replayed():
    probs, masks, gate = _hot_pixel_maps()
    parts = [exact_search.OOFPart(probs[s], masks[s], gate[s]) for s in (slice(0, 18), slice(18, None))]
    tops = (0.0, 36 / 576)  # the highest pixel; the lesion's area
    # no R-TH: the area alone would tell a hot pixel from a lesion; here only the gate may
    pp = replace(BASE, b_th=config_grid(0.5, 0.7, 0.1), r_th=(0,), gate=(0.0, 0.4, 0.5, 0.6), gate_blend=(0.0, 0.5))
    found = exact_search.search_oof(parts, replace(pp, gate_top=tops))
    score, rule = _brute_best(parts, pp.b_th.values(), pp.r_th, pp.gate, pp.gate_blend, tops)
    assert found.score == pytest.approx(score, abs=1e-12) and found.post == rule
    assert found.post.gate_top == tops[1] and found.post.gate_blend == 0.5 and found.post.gate > 0
    peak_only = exact_search.search_oof(parts, replace(pp, gate_top=(0.0,)))
    assert peak_only.post.gate_top == 0.0 and peak_only.score < found.score
    assert "mean of its top 6.25%" in found.post.describe()


def test_search_says_empty_when_nothing_beats_predicting_nothing():
    probs, masks = _inputs(np.uint8, seed=2)
    noise = np.random.default_rng(2).integers(0, 256, probs.shape).astype(np.uint8)  # maps unrelated to the truth
    masks = masks.copy()
    masks[: len(masks) - 1] = False  # all but one image negative
    found = exact_search.search_oof([exact_search.OOFPart(noise, masks, None)], replace(BASE, r_th=(0,), gate=(0.0,)))
    assert found.post.rule == "empty" and found.score == pytest.approx(found.all_empty_score)
    assert not found.post.apply(noise[0]).any()


def config_grid(start, stop, step):
    from pneumothorax.io.config import Grid

    return Grid(start, stop, step)


def _square_maps(lesion_values, blob_values, size=24):
    """uint8 maps (background 10) and masks: a 6x6 lesion square at each given value (None: a negative), and on
    negatives optionally a false blob at the given value (the same square, outside the truth)."""
    maps = np.full((len(lesion_values), size, size), 10, dtype=np.uint8)
    masks = np.zeros(maps.shape, dtype=bool)
    for i, (lesion, blob) in enumerate(zip(lesion_values, blob_values, strict=True)):
        if lesion is not None:
            maps[i, 8:14, 8:14], masks[i, 8:14, 8:14] = lesion, True
        elif blob is not None:
            maps[i, 8:14, 8:14] = blob
    return maps, masks


def test_leaving_one_fold_out_scores_each_fold_with_the_rule_chosen_on_the_others():
    """Part A's lesions sit at p 0.78, part B's at 0.90 with two false blobs at 0.78. Searched on both, the rule
    (B-TH under 0.78) finds A's lesions; left out, A is scored with B's rule (B-TH from 0.78 to 0.90), which finds
    none of them, and B with A's rule, which finds B's 8 lesions and its 2 blobs. A part that leaked into its own
    search would find its lesions."""
    part_a = _square_maps([200] * 12 + [None] * 8, [None] * 20)
    part_b = _square_maps([230] * 8 + [None] * 12, [None] * 8 + [200, 200] + [None] * 10)
    parts = [exact_search.OOFPart(*part_a, None), exact_search.OOFPart(*part_b, None)]
    pp = replace(BASE, b_th=config_grid(0.2, 0.95, 0.05), r_th=(0,), gate=(0.0,), triplet=False, min_component=(0,))
    in_sample = exact_search.search_oof(parts, pp)
    assert in_sample.post.b_th < 200 / 255 and in_sample.score == pytest.approx(38 / 40)
    crossfit = exact_search.crossfit_oof(parts, pp)
    assert [f["found"] for f in crossfit["folds"]] == [0, 8]
    assert [f["gain"] for f in crossfit["folds"]] == pytest.approx([0.0, (8 - 2) / 20])
    assert crossfit["all_empty"] == pytest.approx(20 / 40)
    assert crossfit["score"] == pytest.approx((8 + 18) / 40)
    assert crossfit["gain"] == pytest.approx(6 / 40)
