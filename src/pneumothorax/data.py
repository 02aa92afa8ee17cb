"""Datasets over the prepared caches, augmentation pipelines and the positive-rate sampler."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import dicom, paths, pools, prepare, scale

MEAN, STD = 0.449, 0.226  # ImageNet's mean and std averaged over channels (gray input)


def _expected_max(n: int) -> float:
    """The expected largest of ``n`` absolute standard normal draws (extreme-value approximation)."""
    root = math.sqrt(2.0 * math.log(n))
    return root - (math.log(math.log(n)) + math.log(4.0 * math.pi)) / (2.0 * root)


class SmoothElastic(A.DualTransform):
    """Albumentations' ``ElasticTransform`` (Gaussian noise over its maximum, blurred with ``sigma``, times
    ``alpha``, then ``remap``) with the field drawn at ``1/k`` of the size and upsampled.

    A blur of width ``sigma`` leaves nothing finer than ``sigma`` in the field, so drawing it on a
    grid ``k`` times coarser (``sigma / k`` about 4 pixels) and resizing bilinearly gives a field
    with the same amplitude and smoothness; the amplitude is kept by dividing by ``k`` (a blur of
    white noise shrinks it in proportion to its width) and normalising by the maximum a
    full-size draw would have. At 1024 it measured 15 against 258 ms per image and mask.
    """

    def __init__(self, alpha: float, sigma: float, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.alpha, self.sigma = alpha, sigma

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        """The remap coordinates of one draw."""
        height, width = params["shape"][:2]
        k = max(1, int(self.sigma // 4))
        small = (2, -(-height // k) + 1, -(-width // k) + 1)
        noise = self.random_generator.standard_normal(small, dtype=np.float32)
        full_max = _expected_max(2 * height * width)  # what albumentations divides a full-size draw by
        fields = [
            cv2.resize(cv2.GaussianBlur(n, (0, 0), self.sigma / k, borderType=cv2.BORDER_REPLICATE), (width, height))
            * np.float32(self.alpha / (k * full_max))
            for n in noise
        ]
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return {"map_x": grid_x + fields[0], "map_y": grid_y + fields[1]}

    def apply(self, img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: object) -> np.ndarray:
        """The image, resampled bilinearly (zeros outside, as the original)."""
        return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def apply_to_mask(self, mask: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: object) -> np.ndarray:
        """The mask, resampled by nearest neighbour (stays 0/1)."""
        return cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """For albumentations' serialisation."""
        return ("alpha", "sigma")


def augmentation_groups(size: int, p: float) -> dict[str, A.BasicTransform]:
    """The 2ST-UNet paper's groups (A1-A4) plus CLAHE, each applied with probability ``p``."""
    lo = max(8, int(round(0.75 * size)))
    return {
        "A1": A.HorizontalFlip(p=0.5),
        "A2": A.OneOf(
            [
                A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2, p=1.0),
                A.RandomGamma(gamma_limit=(80, 120), p=1.0),
                A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.0, p=1.0),
            ],
            p=p,
        ),
        "A3": A.OneOf(
            [
                SmoothElastic(alpha=size / 4, sigma=max(1.0, size / 40), p=1.0),
                A.GridDistortion(p=1.0),
                A.OpticalDistortion(distort_limit=0.1, p=1.0),
            ],
            p=p,
        ),
        "A4": A.RandomSizedCrop(min_max_height=(lo, size), size=(size, size), p=p),
        "CLAHE": A.CLAHE(p=p),
    }


def segmentation_augment(names: Sequence[str], size: int, p: float) -> A.Compose:
    """An albumentations pipeline from group names (unknown names list the valid ones)."""
    groups = augmentation_groups(size, p)
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise ValueError(f"unknown augmentation group {unknown[0]!r}; choose from {sorted(groups)}")
    return A.Compose([groups[n] for n in names])


def classifier_augment(size: int, p: float) -> A.Compose:
    """Aggressive image-level augmentation: flip, zoom in and out, CLAHE."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.8, 1.2),
                translate_percent=(-0.05, 0.05),
                rotate=(-10, 10),
                p=p,
                border_mode=cv2.BORDER_CONSTANT,
            ),
            A.CLAHE(p=p),
            A.RandomBrightnessContrast(p=p),
        ]
    )


SampleKey = tuple[int, int, int]  # (sampler seed, epoch, position in the epoch's global order)


def augment_state(key: SampleKey) -> tuple[np.random.Generator, random.Random]:
    """The random state of one sample's augmentation: one NumPy stream, and a Python one drawn from it.

    Every transform of a pipeline draws from these same two streams in turn, so the groups are
    applied independently of each other; the key depends neither on the DataLoader worker nor
    on the DDP rank that loads the sample, so a resumed or distributed run sees the same stream.
    """
    rng = np.random.default_rng([int(k) for k in key])
    return rng, random.Random(int(rng.integers(2**63)))


def apply_augment(transform: A.Compose, key: SampleKey, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``transform`` on ``arrays`` with the random state of sample ``key``."""
    transform.set_random_state(*augment_state(key))
    return transform(**arrays)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> uint8 (1, H, W): what loader workers ship (a quarter of float32, a twelfth of
    3-channel float32); :func:`model_input` normalises and expands it on the device."""
    return torch.from_numpy(np.ascontiguousarray(image))[None]


def model_input(x: torch.Tensor, channels: int, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A uint8 (B, 1, H, W) batch -> the normalised float (B, channels, H, W) input, on ``device``."""
    x = x.to(device, non_blocking=True).float().div_(255.0).sub_(MEAN).div_(STD).expand(-1, channels, -1, -1)
    memory_format = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


def model_target(y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 mask or a float label batch -> float, on ``device``."""
    return y.to(device, non_blocking=True).float()


class CacheDataset(Dataset):
    """Rows of a prepared cache: (image tensor, target) where target is the mask or the label."""

    def __init__(
        self,
        processed: str | Path,
        split: str,
        size: int,
        rows: Sequence[int],
        transform: A.Compose | None = None,
        target: str = "mask",
        labels: Sequence[int] | None = None,
    ) -> None:
        self.processed, self.split, self.size = Path(processed), split, size
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform, self.target = transform, target
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    def _open(self) -> None:  # opened lazily, so each DataLoader worker maps its own view
        if self._images is None:
            self._images = prepare.load_cache(self.processed, "images", self.split, self.size)
            if self.target == "mask":
                self._masks = prepare.load_cache(self.processed, "masks", self.split, self.size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | tuple[int, SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``, or ``(i, key)`` from :class:`PositiveRateSampler`: augmented with that sample's random state."""
        i, key = item if isinstance(item, tuple) else (item, None)
        self._open()
        row = int(self.rows[i])
        image = np.array(self._images[row])  # a writable copy
        augment = self.transform is not None and key is not None
        if self.target == "mask":
            mask = np.array(self._masks[row])
            if augment:
                out = apply_augment(self.transform, key, image=image, mask=mask)
                image, mask = out["image"], out["mask"]
            return to_tensor(image), to_tensor(mask)
        if augment:
            image = apply_augment(self.transform, key, image=image)["image"]
        label = torch.tensor([self.labels[i]]) if self.labels is not None else torch.zeros(1)
        return to_tensor(image), label


class PositiveRateSampler(Sampler[tuple[int, SampleKey]]):
    """The 1st place's sampling: every positive each epoch, plus negatives so positives make ``rate``.

    ``rate`` may fall linearly from ``rate`` to ``rate_end`` over ``epochs`` epochs. With
    ``rate=None`` every image is used once per epoch. The order depends only on
    ``(seed, epoch)``, so a resumed run sees the same epochs. Under DDP each of
    ``world_size`` ranks takes every ``world_size``-th index of a padded permutation.
    Yields ``(index, key)``: ``key = (seed, epoch, position)`` seeds that sample's augmentation
    (:func:`augment_state`), the same whichever worker or rank loads it.
    """

    def __init__(
        self,
        labels: Sequence[int],
        rate: float | None = None,
        rate_end: float | None = None,
        epochs: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.labels = np.asarray(labels).astype(bool)
        if rate is not None and not 0 < rate <= 1:
            raise ValueError(f"positive_rate must be in (0, 1], got {rate}")
        self.rate, self.rate_end, self.epochs = rate, rate_end, max(1, epochs)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (within its stage) whose order to produce."""
        self.epoch = epoch

    def current_rate(self) -> float | None:
        """The positive share for the current epoch."""
        if self.rate is None:
            return None
        if self.rate_end is None or self.epochs == 1:
            return self.rate
        t = min(1.0, self.epoch / (self.epochs - 1))
        return self.rate + (self.rate_end - self.rate) * t

    def _epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        rate = self.current_rate()
        if rate is None:
            return rng.permutation(len(self.labels))
        pos, neg = np.flatnonzero(self.labels), np.flatnonzero(~self.labels)
        n_neg = min(len(neg), int(round(len(pos) * (1 - rate) / rate))) if len(pos) else len(neg)
        chosen = np.concatenate([pos, rng.choice(neg, size=n_neg, replace=False)])
        return rng.permutation(chosen)

    def __iter__(self) -> Iterator[tuple[int, SampleKey]]:
        indices = self._epoch_indices()
        positions = np.arange(len(indices))
        if self.world_size > 1:
            total = math.ceil(len(indices) / self.world_size) * self.world_size
            indices = np.resize(indices, total)[self.rank :: self.world_size]
            positions = np.arange(total)[self.rank :: self.world_size]
        keys = ((self.seed, self.epoch, int(p)) for p in positions)
        return iter(zip(indices.tolist(), keys, strict=True))

    def __len__(self) -> int:
        n = len(self._epoch_indices())
        return math.ceil(n / self.world_size) if self.world_size > 1 else n


def resolve_workers(workers: int | str) -> int:
    """``data.workers``: a number, or ``auto`` = the cores this process may use divided by the training
    processes on this machine (``LOCAL_WORLD_SIZE`` under torchrun), less one for the training loop."""
    if workers != "auto":
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, per_process - 1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler | None = None,
    workers: int | str = 0,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader whose workers live as long as it does (each sample's augmentation is seeded by
    its sampler key, not by worker state, so workers can persist across epochs)."""
    workers = resolve_workers(workers)
    if workers > 0:
        pools.single_threaded_opencv()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def train_rows(processed: str | Path, folds_csv: str | Path) -> pd.DataFrame:
    """Training rows of ``metadata.csv`` that decoded, with their folds (an experiment's ``folds.csv``)."""
    meta = pd.read_csv(
        paths.ProcessedDir(processed).metadata, dtype={"image_id": str, "patient": str}, keep_default_na=False
    )
    folds = pd.read_csv(folds_csv, dtype={"image_id": str})
    meta = meta[(meta["split"] == "train") & (meta["error"] == "")]
    return meta.merge(folds[["image_id", "fold"]], on="image_id", how="inner").reset_index(drop=True)


def read_image(path: str | Path, size: int) -> np.ndarray:
    """A grayscale uint8 image (PNG/JPEG, or DICOM by suffix) resized to ``size`` x ``size``."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        image, _ = dicom.read(path)
    else:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"{path}: not a readable image")
    return scale.downscale(image, size)


class ImageListDataset(Dataset):
    """Images from a list of files with 0/1 labels (external pre-training sets)."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        size: int,
        transform: A.Compose | None = None,
    ) -> None:
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.float32)
        self.size, self.transform = size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``, or ``(i, key)`` from :class:`PositiveRateSampler` (augmented)."""
        i, key = item if isinstance(item, tuple) else (item, None)
        image = read_image(self.paths[i], self.size)
        if self.transform is not None and key is not None:
            image = apply_augment(self.transform, key, image=image)["image"]
        return to_tensor(image), torch.tensor([self.labels[i]])
