"""What segmentation and classifier training share: devices, DDP, AMP, checkpoints, RNG state, logs."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import files


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: device, DDP rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this is one of several DDP processes."""
        return self.world_size > 1


def setup_runtime(device: str | None = None) -> Runtime:
    """Pick the device and, under ``torchrun`` (WORLD_SIZE > 1), join the process group.

    NCCL on CUDA, gloo on CPU. ``device`` forces ``cpu`` or ``cuda``; default: CUDA if present.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(dev, rank, world_size)


def teardown(runtime: Runtime) -> None:
    """Leave the process group, if any."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def running(device: str | None = None) -> Iterator[Runtime]:
    """:func:`setup_runtime` for the block, :func:`teardown` however it ends."""
    runtime = setup_runtime(device)
    try:
        yield runtime
    finally:
        teardown(runtime)


def barrier(runtime: Runtime) -> None:
    """Wait for every rank (no-op alone)."""
    if runtime.distributed:
        dist.barrier()


def broadcast_module(module: nn.Module, runtime: Runtime) -> None:
    """Make every rank hold rank 0's parameters and buffers."""
    if runtime.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def broadcast_float(value: float, runtime: Runtime) -> float:
    """Rank 0's value on every rank."""
    if not runtime.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 or fp16); a no-op on CPU or with ``amp='none'``."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at first use)
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """All RNG states, for a checkpoint."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically."""
    with files.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``; RNG states are plain containers)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a model's state dict (DDP unwrapped)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def make_logger(path: Path | None, name: str, enabled: bool = True) -> logging.Logger:
    """A logger that writes to ``path`` (appending: a resumed run keeps its history) and stderr."""
    logger = logging.getLogger(f"pneumothorax.{name}.{os.getpid()}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if path is not None and enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def optimizer_for(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (AdamW when weight decay is set)."""
    if weight_decay:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr)


def scheduler_for(
    opt: torch.optim.Optimizer, kind: str, epochs: int, min_lr: float, factor: float = 0.2, patience: int = 5
) -> Any:
    """Per-epoch schedule: cosine annealing to ``min_lr``, ReduceLROnPlateau on the val score, or constant."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=min_lr)
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=factor, patience=patience, min_lr=min_lr
        )
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown scheduler {kind!r}; choose cosine, plateau or constant")


def plot_curves(metrics: Any, path: Path, columns: list[tuple[str, str]]) -> None:
    """Plot training curves (pairs of column and title) from a metrics DataFrame into a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.4))
    for ax, (column, title) in zip(np.atleast_1d(axes), columns, strict=True):
        for kind, part in metrics.groupby("kind"):
            if column in part and part[column].notna().any():
                ax.plot(part["epoch"], part[column], "o-" if kind != "epoch" else "-", label=kind, ms=4)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. a validation column before any validation ran
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
