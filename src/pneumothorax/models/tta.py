"""Prediction with flip TTA and model averaging: batches, streamed uint8 maps, image-level probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pneumothorax.data import datasets
from pneumothorax.io import atomic, processes, progress_bars
from pneumothorax.models import devices

FLIPS: dict[str, tuple[int, ...]] = {"hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}


def tta_views(tta: Sequence[str]) -> list[tuple[int, ...]]:
    """The flip dims of each TTA view; the identity ``()`` first."""
    unknown = [t for t in tta if t not in FLIPS]
    if unknown:
        raise ValueError(f"unknown TTA {unknown[0]!r}; choose from {sorted(FLIPS)}")
    return [(), *(FLIPS[t] for t in tta)]


@torch.no_grad()
def predict_batch(models: Sequence[nn.Module], x: torch.Tensor, tta: Sequence[str], amp: str = "none") -> torch.Tensor:
    """Mean sigmoid output over models and TTA views (each view flipped back).

    On an accelerator all views of a batch go through a model in one forward pass (a fuller batch).
    On CPU they go one view at a time: there a batch twice as large took 2.2-2.4x the time of one,
    two passes 1.9-2.1x (``make bench-post``).
    """
    views = tta_views(tta)
    flipped = [x.flip(d) if d else x for d in views]
    batches = flipped if x.device.type == "cpu" else [torch.cat(flipped, dim=0)]
    total = None
    for model in models:
        with devices.autocast(x.device, amp):
            outs = [torch.sigmoid(model(batch).float()) for batch in batches]
        parts = [part for out in outs for part in out.split(x.shape[0], dim=0)]
        summed = sum(p.flip(d) if d else p for p, d in zip(parts, views, strict=True))
        total = summed if total is None else total + summed
    return total / (len(models) * len(views))


def inference_loader(dataset: Dataset, batch_size: int, workers: int | str, device: torch.device) -> DataLoader:
    """Batches in order, loaded by ``data.workers`` processes into pinned memory on CUDA (copies overlap compute)."""
    count = datasets.resolve_workers(workers)
    if count > 0:
        processes.single_threaded_opencv()
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=count, pin_memory=device.type == "cuda"
    )


def to_uint8(probs: torch.Tensor) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 p*255, rounded."""
    return probs.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def predict_to_file(
    models: Sequence[nn.Module],
    dataset: Dataset,
    out_path: Path,
    tta: Sequence[str],
    device: torch.device,
    channels: int,
    batch_size: int = 16,
    amp: str = "none",
    channels_last: bool = False,
    workers: int | str = 0,
    progress: bool = True,
    desc: str = "predict",
) -> Path:
    """Predict every item of ``dataset`` into ``out_path`` (N, H, W) uint8 p*255, atomically.

    Peak memory is one batch: the output is a memory map on disk.
    """
    loader = inference_loader(dataset, batch_size, workers, device)
    first, _ = dataset[0]
    shape = (len(dataset), first.shape[-2], first.shape[-1])
    for model in models:
        model.eval()
    with atomic.atomic_path(out_path) as tmp:
        out = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        start = 0
        for images, _ in progress_bars.bar(loader, desc, progress, unit="batch"):
            x = datasets.model_input(images, channels, device, channels_last)
            probs = predict_batch(models, x, tta, amp)[:, 0]
            out[start : start + len(x)] = to_uint8(probs)
            start += len(x)
        out.flush()
        del out
    return out_path


@torch.no_grad()
def predict_labels(
    models: Sequence[nn.Module],
    dataset: Dataset,
    tta: Sequence[str],
    device: torch.device,
    channels: int,
    batch_size: int = 32,
    amp: str = "none",
    progress: bool = True,
    desc: str = "classify",
    channels_last: bool = False,
    workers: int | str = 0,
) -> np.ndarray:
    """Image-level probabilities (mean over models and TTA views) for every item."""
    loader = inference_loader(dataset, batch_size, workers, device)
    for model in models:
        model.eval()
    out = []
    for images, _ in progress_bars.bar(loader, desc, progress, unit="batch"):
        x = datasets.model_input(images, channels, device, channels_last)
        out.append(labels_batch(models, x, tta, amp).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def labels_batch(models: Sequence[nn.Module], x: torch.Tensor, tta: Sequence[str], amp: str = "none") -> torch.Tensor:
    """Image-level probabilities of one batch: the mean over models and TTA views, all views in one pass."""
    views = tta_views(tta)
    stacked = torch.cat([x.flip(d) if d else x for d in views], dim=0)
    total = 0.0
    for model in models:
        with devices.autocast(x.device, amp):
            total = total + torch.sigmoid(model(stacked).float()).view(len(views), len(x)).mean(0)
    return total / len(models)
