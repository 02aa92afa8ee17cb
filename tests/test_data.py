"""Sampler semantics, augmentation groups and the cache dataset."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from pneumothorax.data import augmentations, datasets, prepared, sample_augment
from pneumothorax.io import config


def _indices(sampler):
    return [i for i, _ in sampler]


def test_positive_rate_sampler():
    labels = np.array([1] * 20 + [0] * 80)
    s = datasets.PositiveRateSampler(labels, rate=0.5, seed=0)
    idx = _indices(s)
    assert len(idx) == 40 and len(set(idx)) == 40
    assert set(range(20)) <= set(idx)  # every positive every epoch
    s.set_epoch(1)
    assert _indices(s) != idx  # new negatives each epoch
    s.set_epoch(0)
    assert _indices(s) == idx  # the order depends only on (seed, epoch)
    assert [key for _, key in s] == [(0, 0, p) for p in range(40)]  # (seed, epoch, position)
    falling = datasets.PositiveRateSampler(labels, rate=0.8, rate_end=0.4, epochs=5, seed=0)
    sizes = []
    for e in range(5):
        falling.set_epoch(e)
        sizes.append(len(_indices(falling)))
    assert sizes[0] == 25 and sizes[-1] == 50 and sizes == sorted(sizes)
    natural = datasets.PositiveRateSampler(labels)
    assert sorted(_indices(natural)) == list(range(100))


def test_sampler_splits_across_ranks():
    labels = np.array([1] * 7 + [0] * 30)
    parts = [list(datasets.PositiveRateSampler(labels, 0.5, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    whole = list(datasets.PositiveRateSampler(labels, 0.5, seed=3))
    assert {i for i, _ in parts[0]} | {i for i, _ in parts[1]} == {i for i, _ in whole}
    # a sample keeps its key (so its augmentation) whichever rank loads it
    assert set(parts[0][:-1]) | set(parts[1][:-1]) <= set(whole) and not set(parts[0]) & set(parts[1])


def test_augment_groups():
    groups = augmentations.augmentation_groups(64, 1.0)
    assert set(groups) == set(typing.get_args(config.AugmentGroup))  # the registry is what configs may name
    aug = augmentations.segmentation_augment(list(groups), 64, 1.0)
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 1
    out = aug(image=image, mask=mask)
    assert out["image"].shape == (64, 64) and set(np.unique(out["mask"])) <= {0, 1}
    with pytest.raises(ValueError, match="choose from"):
        augmentations.segmentation_augment(["A9"], 64, 0.5)


def test_cache_dataset(processed):
    rows = datasets.train_rows(processed, processed / "folds.csv")
    ds = datasets.CacheDataset(processed, "train", 64, rows["index"].to_numpy()[:4])
    x, y = ds[0]  # what workers ship: uint8, one channel
    assert x.shape == y.shape == (1, 64, 64) and x.dtype == y.dtype == torch.uint8 and y.max() <= 1
    images = prepared.load_cache(processed, "images", "train", 64)
    assert torch.equal(x[0], torch.from_numpy(np.array(images[rows["index"].iloc[0]])))
    batch = datasets.model_input(torch.stack([x, x]), 3, torch.device("cpu"))  # normalised and expanded on the device
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    expected = (x[0].float() / 255 - datasets.MEAN) / datasets.STD
    assert all(torch.allclose(batch[1, c], expected) for c in range(3))
    labels = datasets.CacheDataset(
        processed,
        "train",
        32,
        rows["index"].to_numpy()[:4],
        target="label",
        labels=rows["has_pneumothorax"].to_numpy()[:4],
    )
    assert labels[1][1].item() == rows["has_pneumothorax"].iloc[1]


def test_clahe_evens_out_local_contrast_the_same_way_for_every_reader(processed):
    """``data.clahe``: a dim, flat image is spread over more grey levels, tile by tile (8 x 8 tiles at every
    size); 0 leaves it as is; the cache dataset hands out the equalized image, masks untouched."""
    ramp = np.tile(np.linspace(100, 140, 64).astype(np.uint8), (64, 1))  # 41 grey levels, low contrast
    assert datasets.equalize(ramp, 0.0) is ramp
    out = datasets.equalize(ramp, 2.0)
    assert out.shape == ramp.shape and out.dtype == np.uint8
    assert int(out.max()) - int(out.min()) > 1.4 * (int(ramp.max()) - int(ramp.min()))  # 59 levels against 40
    assert np.corrcoef(out.ravel(), ramp.ravel())[0, 1] > 0.95  # the ramp's order kept, up to tile seams
    dark, bright = np.full((64, 64), 30, np.uint8), np.full((64, 64), 220, np.uint8)
    halves = np.concatenate([dark, bright], axis=1)[:, 32:96]  # one image, two exposures
    spread = datasets.equalize(halves + np.random.default_rng(0).integers(0, 6, halves.shape, dtype=np.uint8), 2.0)
    assert spread[:, :32].std() > 2 * halves[:, :32].std() + 1  # the flat dark half's noise is stretched
    rows = datasets.train_rows(processed, processed / "folds.csv")["index"].to_numpy()[:3]
    plain = datasets.CacheDataset(processed, "train", 64, rows)
    equalized = datasets.CacheDataset(processed, "train", 64, rows, clahe=2.0)
    for i in range(3):
        (x, y), (x2, y2) = plain[i], equalized[i]
        assert torch.equal(x2[0], torch.from_numpy(datasets.equalize(x[0].numpy(), 2.0))) and torch.equal(y, y2)
        assert not torch.equal(x, x2)


GROUP_OF = {
    "HorizontalFlip": "A1",
    "RandomBrightnessContrast": "A2",
    "RandomGamma": "A2",
    "SmoothElastic": "A3",
    "GridDistortion": "A3",
    "OpticalDistortion": "A3",
}


def test_augmentation_groups_are_applied_independently():
    """albumentations' set_random_seed gives every child the same seed (A1-A3 all or none: correlation
    1.0); one shared random state per sample makes the groups independent."""
    aug = augmentations.segmentation_augment(["A1", "A2", "A3"], 32, 0.5)
    aug.save_applied_params = True
    image = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    applied = np.zeros((600, 3))
    for n in range(len(applied)):
        out = sample_augment.apply_augment(aug, (7, 0, n), image=image)
        groups = {GROUP_OF[name] for name, _ in out["applied_transforms"]}
        applied[n] = [g in groups for g in ("A1", "A2", "A3")]
    rates = applied.mean(axis=0)
    assert np.all(np.abs(rates - 0.5) < 0.08), rates
    corr = np.corrcoef(applied.T)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.12, corr


def _augmented(processed, sampler, workers):
    import torch

    rows = datasets.train_rows(processed, processed / "folds.csv")
    same_row = np.full(len(sampler.labels), rows["index"].iloc[0])  # every item is the same image
    ds = datasets.CacheDataset(
        processed, "train", 32, same_row, augmentations.segmentation_augment(["A1", "A2", "A3"], 32, 0.9)
    )
    return torch.cat([x for x, _ in datasets.make_loader(ds, 4, sampler, workers)])


def test_workers_ranks_and_resumes_see_the_right_augmentations(processed):
    labels = np.zeros(16, dtype=int)
    two_workers = _augmented(processed, datasets.PositiveRateSampler(labels, seed=5), workers=2)
    flat = two_workers.flatten(1)
    distinct = {tuple(np.round(r.numpy(), 3)) for r in flat}
    assert len(distinct) >= 12  # worker 0 and worker 1 used to produce identical batches
    torch = pytest.importorskip("torch")
    assert not torch.equal(two_workers[:4], two_workers[4:8])
    # the same samples, loaded by two ranks: each sample augmented exactly as in one process
    ranks = [
        _augmented(processed, datasets.PositiveRateSampler(labels, seed=5, rank=r, world_size=2), 0) for r in (0, 1)
    ]
    assert torch.equal(ranks[0], two_workers[0::2]) and torch.equal(ranks[1], two_workers[1::2])
    assert not torch.equal(ranks[0], ranks[1])
    # a resumed run (a fresh sampler set to epoch 3) replays the same stream as one that ran epochs 0-2
    ran = datasets.PositiveRateSampler(labels, seed=5)
    for epoch in range(3):
        ran.set_epoch(epoch)
        list(ran)
    ran.set_epoch(3)
    resumed = datasets.PositiveRateSampler(labels, seed=5)
    resumed.set_epoch(3)
    assert torch.equal(_augmented(processed, ran, 0), _augmented(processed, resumed, 0))
    assert not torch.equal(_augmented(processed, resumed, 0), two_workers)  # another epoch, other draws


def _field(transform, size, draws):
    import random

    grid = np.meshgrid(np.arange(size), np.arange(size))[0]
    out = []
    for seed in range(draws):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out.append(transform.get_params_dependent_on_data({"shape": (size, size)}, {})["map_x"] - grid)
    return np.stack(out)[:, size // 8 : -size // 8, size // 8 : -size // 8]  # the interior


def test_smooth_elastic_draws_the_field_albumentations_draws():
    """The low-resolution field has albumentations' amplitude and smoothness (interior; measured at 1024:
    std 0.584 against 0.544 px, correlation at a lag of sigma 0.786 against 0.773)."""
    import albumentations as A

    size, lag = 512, 512 // 40
    ours = _field(augmentations.SmoothElastic(alpha=size / 4, sigma=size / 40, p=1.0), size, 6)
    theirs = _field(A.ElasticTransform(alpha=size / 4, sigma=size / 40, p=1.0), size, 6)
    assert ours.std() == pytest.approx(theirs.std(), rel=0.15)

    def corr(fields):
        return np.mean([np.corrcoef(f[:, :-lag].ravel(), f[:, lag:].ravel())[0, 1] for f in fields])

    assert corr(ours) == pytest.approx(corr(theirs), abs=0.05)
    mask = np.zeros((size, size), np.uint8)
    mask[100:300, 100:300] = 1
    out = sample_augment.apply_augment(
        A.Compose([augmentations.SmoothElastic(size / 4, size / 40, p=1.0)]), (1, 0, 0), image=mask * 200, mask=mask
    )
    assert set(np.unique(out["mask"])) == {0, 1} and abs(int(out["mask"].sum()) - 200 * 200) < 0.02 * 200 * 200


def test_epoch_images_draws_a_fixed_epoch_in_the_positive_rate():
    labels = np.array([1] * 700 + [0] * 500)  # extra positives: more positives than negatives
    sampler = datasets.PositiveRateSampler(labels, 0.5, 0.25, epochs=4, seed=1, epoch_images=200)
    epochs = []
    for epoch, want in ((0, 100), (3, 50)):
        sampler.set_epoch(epoch)
        drawn = [i for i, _ in sampler]
        assert len(drawn) == len(sampler) == 200 and len(set(drawn)) == 200  # no image twice in an epoch
        assert int(labels[drawn].sum()) == want  # the rate, falling from a half to a quarter
        epochs.append(drawn)
    assert set(epochs[0]) != set(epochs[1])  # drawn afresh each epoch
    natural = datasets.PositiveRateSampler(labels, None, epoch_images=120, seed=2)
    assert int(labels[[i for i, _ in natural]].sum()) == 70  # without a rate: the natural share, 7/12
