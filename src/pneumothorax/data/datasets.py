"""Datasets over the prepared caches, the positive-rate sampler, and the loaders that feed the model."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pneumothorax.data import prepared
from pneumothorax.data.sample_augment import SampleKey, apply_augment
from pneumothorax.io import images, paths, processes, resize

if TYPE_CHECKING:  # annotations only: inference processes load no albumentations
    import albumentations as A

MEAN, STD = 0.449, 0.226  # ImageNet's mean and std averaged over channels (gray input)


def equalize(image: np.ndarray, clip: float) -> np.ndarray:
    """``image`` (uint8) under CLAHE with clip limit ``clip`` on 8 x 8 tiles, so at every size the same share of the
    image (``data.clahe``: local contrast evened out before the model, in training and prediction alike); 0: as is."""
    if not clip:
        return image
    return cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(8, 8)).apply(np.ascontiguousarray(image))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> uint8 (1, H, W): what loader workers ship (a quarter of float32, a twelfth of
    3-channel float32); :func:`model_input` normalises and expands it on the device."""
    return torch.from_numpy(np.ascontiguousarray(image))[None]


def model_input(x: torch.Tensor, channels: int, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A uint8 (B, 1, H, W) batch -> the normalised float (B, channels, H, W) input, on ``device``."""
    x = x.to(device, non_blocking=True).float().div_(255.0).sub_(MEAN).div_(STD).expand(-1, channels, -1, -1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


def model_target(y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 mask or a float label batch -> float, on ``device``."""
    return y.to(device, non_blocking=True).float()


class CacheDataset(Dataset):
    """Rows of prepared caches: (image tensor, target) where target is the mask or the label.

    ``split`` names the caches (``train``, ``test``, ``extra``): one for every row, or one per row (a
    fold's training images with the extra ones, say).
    """

    def __init__(
        self,
        processed: str | Path,
        split: str | Sequence[str],
        size: int,
        rows: Sequence[int],
        transform: A.Compose | None = None,
        target: str = "mask",
        labels: Sequence[int] | None = None,
        clahe: float = 0.0,
    ) -> None:
        self.processed, self.size, self.clahe = Path(processed), size, clahe
        self.rows = np.asarray(rows, dtype=np.int64)
        self.splits = np.full(len(self.rows), split, dtype=object) if isinstance(split, str) else np.asarray(split)
        if len(self.splits) != len(self.rows):
            raise ValueError(f"{len(self.splits)} splits for {len(self.rows)} rows")
        self.transform, self.target = transform, target
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        self._images: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

    def _open(self) -> None:  # opened lazily, so each DataLoader worker maps its own view
        if not self._images:
            for split in dict.fromkeys(self.splits.tolist()):
                self._images[split] = prepared.load_cache(self.processed, "images", split, self.size)
                if self.target == "mask":
                    self._masks[split] = prepared.load_cache(self.processed, "masks", split, self.size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | tuple[int, SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``, or ``(i, key)`` from :class:`PositiveRateSampler`: augmented with that sample's random state."""
        i, key = item if isinstance(item, tuple) else (item, None)
        self._open()
        row, split = int(self.rows[i]), self.splits[i]
        image = equalize(np.array(self._images[split][row]), self.clahe)  # a writable copy
        augment = self.transform is not None and key is not None
        if self.target == "mask":
            mask = np.array(self._masks[split][row])
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
    ``rate=None`` every image is used once per epoch. With ``epoch_images``, each epoch is that many images
    drawn afresh in that proportion instead (a fixed epoch cost when extra positives make the set large).
    The order depends only on ``(seed, epoch)``, so a resumed run sees the same epochs. Under DDP each of
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
        epoch_images: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels).astype(bool)
        self.epoch_images = epoch_images
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
        if self.epoch_images is not None:
            return rng.permutation(self._drawn(rng, rate))
        if rate is None:
            return rng.permutation(len(self.labels))
        pos, neg = np.flatnonzero(self.labels), np.flatnonzero(~self.labels)
        n_neg = min(len(neg), int(round(len(pos) * (1 - rate) / rate))) if len(pos) else len(neg)
        chosen = np.concatenate([pos, rng.choice(neg, size=n_neg, replace=False)])
        return rng.permutation(chosen)

    def _drawn(self, rng: np.random.Generator, rate: float | None) -> np.ndarray:
        """``epoch_images`` images drawn afresh each epoch: positives making ``rate`` of them (the natural share
        without a rate), without replacement while a class has enough."""
        n = int(self.epoch_images)
        pos, neg = np.flatnonzero(self.labels), np.flatnonzero(~self.labels)
        share = self.labels.mean() if rate is None else rate
        n_pos = min(n, int(round(n * share))) if len(pos) else 0
        n_neg = n - n_pos if len(neg) else 0
        wanted = ((pos, n_pos), (neg, n_neg))
        parts = [rng.choice(group, size=k, replace=k > len(group)) for group, k in wanted if k]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

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
    """``data.workers``: a number, or ``auto`` = the cores this process may use, shared by the training processes
    on this machine (``LOCAL_WORLD_SIZE`` under torchrun) and by the jobs the GPU pool runs at once
    (``PNEUMOTHORAX_POOL_JOBS``: four folds on four GPUs take a quarter each), less one for the training loop."""
    if workers != "auto":
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    sharing = processes_here * max(1, int(os.environ.get(processes.POOL_JOBS, "1")))
    return max(0, cores // sharing - 1)


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
        processes.single_threaded_opencv()
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


def _metadata(processed: str | Path) -> pd.DataFrame:
    return pd.read_csv(
        paths.ProcessedDir(processed).metadata, dtype={"image_id": str, "patient": str}, keep_default_na=False
    )


def train_rows(processed: str | Path, folds_csv: str | Path) -> pd.DataFrame:
    """Training rows of ``metadata.csv`` that decoded, with their folds (an experiment's ``folds.csv``)."""
    meta = _metadata(processed)
    folds = pd.read_csv(folds_csv, dtype={"image_id": str})
    meta = meta[(meta["split"] == "train") & (meta["error"] == "")]
    return meta.merge(folds[["image_id", "fold"]], on="image_id", how="inner").reset_index(drop=True)


def fold_rows(
    processed: str | Path, folds_csv: str | Path, fold: int, use_extra: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold ``fold``'s training and validation rows. With ``use_extra`` the training rows end with the extra
    training images (``split`` extra) of every patient but the validation images' (no patient is on both
    sides); validation rows are always competition images."""
    rows = train_rows(processed, folds_csv)
    train, valid = rows[rows["fold"] != fold], rows[rows["fold"] == fold]
    if use_extra:
        meta = _metadata(processed)
        extra = meta[(meta["split"] == "extra") & (meta["error"] == "")]
        extra = extra[~extra["patient"].isin(set(valid["patient"]))].assign(fold=-1)
        train = pd.concat([train, extra], ignore_index=True)
    return train.reset_index(drop=True), valid.reset_index(drop=True)


def read_image(path: str | Path, size: int) -> np.ndarray:
    """A grayscale uint8 image (DICOM, PNG or JPEG) resized to ``size`` x ``size``."""
    return resize.downscale(images.read(path)[0], size)


class ImageListDataset(Dataset):
    """Images from a list of files with 0/1 labels (external pre-training sets)."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        size: int,
        transform: A.Compose | None = None,
        clahe: float = 0.0,
    ) -> None:
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.float32)
        self.size, self.transform, self.clahe = size, transform, clahe

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``, or ``(i, key)`` from :class:`PositiveRateSampler` (augmented)."""
        i, key = item if isinstance(item, tuple) else (item, None)
        image = equalize(read_image(self.paths[i], self.size), self.clahe)
        if self.transform is not None and key is not None:
            image = apply_augment(self.transform, key, image=image)["image"]
        return to_tensor(image), torch.tensor([self.labels[i]])
