"""Sampler semantics, augmentation groups and the cache dataset."""

from __future__ import annotations

import numpy as np
import pytest

from pneumothorax import data


def test_positive_rate_sampler():
    labels = np.array([1] * 20 + [0] * 80)
    s = data.PositiveRateSampler(labels, rate=0.5, seed=0)
    idx = list(s)
    assert len(idx) == 40 and len(set(idx)) == 40
    assert set(range(20)) <= set(idx)  # every positive every epoch
    s.set_epoch(1)
    assert list(s) != idx  # new negatives each epoch
    s.set_epoch(0)
    assert list(s) == idx  # the order depends only on (seed, epoch)
    falling = data.PositiveRateSampler(labels, rate=0.8, rate_end=0.4, epochs=5, seed=0)
    sizes = []
    for e in range(5):
        falling.set_epoch(e)
        sizes.append(len(list(falling)))
    assert sizes[0] == 25 and sizes[-1] == 50 and sizes == sorted(sizes)
    natural = data.PositiveRateSampler(labels)
    assert sorted(natural) == list(range(100))


def test_sampler_splits_across_ranks():
    labels = np.array([1] * 7 + [0] * 30)
    parts = [list(data.PositiveRateSampler(labels, 0.5, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    whole = list(data.PositiveRateSampler(labels, 0.5, seed=3))
    assert set(parts[0]) | set(parts[1]) == set(whole)


def test_augment_groups():
    aug = data.segmentation_augment(["A1", "A2", "A3", "A4", "CLAHE"], 64, 1.0)
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 1
    out = aug(image=image, mask=mask)
    assert out["image"].shape == (64, 64) and set(np.unique(out["mask"])) <= {0, 1}
    with pytest.raises(ValueError, match="choose from"):
        data.segmentation_augment(["A9"], 64, 0.5)


def test_cache_dataset(processed):
    rows = data.train_rows(processed)
    ds = data.CacheDataset(processed, "train", 64, rows["index"].to_numpy()[:4], channels=3)
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y.shape == (1, 64, 64) and y.max() <= 1
    labels = data.CacheDataset(
        processed,
        "train",
        32,
        rows["index"].to_numpy()[:4],
        1,
        target="label",
        labels=rows["has_pneumothorax"].to_numpy()[:4],
    )
    assert labels[1][1].item() == rows["has_pneumothorax"].iloc[1]
