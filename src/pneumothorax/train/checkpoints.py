"""Checkpoints and reproducibility: atomic saves, safe loads, CPU copies of weights, RNG states, seeding."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumothorax.io import atomic
from pneumothorax.models import devices


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch. ``deterministic``: torch's deterministic kernels (slower on GPU,
    and every new allocation is filled); otherwise cuDNN picks the fastest kernels (``benchmark``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at first use)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def rng_state() -> dict[str, Any]:
    """All RNG states, for a checkpoint."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # the current device only: a resume may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, list | tuple) else cuda)  # older states: one per GPU


def _numpy_state() -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically."""
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``; RNG states are plain containers)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a model's state dict (DDP unwrapped)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in devices.unwrap(model).state_dict().items()}
