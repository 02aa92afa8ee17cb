"""What segmentation and classifier training share: devices, DDP, AMP, checkpoints, RNG state, logs."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data, files


class DeviceError(RuntimeError):
    """A GPU is there but torch cannot use it; the message says why and what to do."""


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: device, DDP rank and world size, and the process group of its collectives.

    ``group`` serves tensors on ``device``: the default group when it has a backend for that
    device type (NCCL serves only CUDA tensors), else a gloo group made for it. Every
    collective of the trainer goes through it, on ``device``.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    group: Any = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this is one of several DDP processes."""
        return self.world_size > 1


def nvidia_gpu_present() -> str | None:
    """The NVIDIA driver's version line when a GPU is visible to this machine, else None."""
    version = Path("/proc/driver/nvidia/version")
    if version.exists():
        lines = version.read_text().splitlines()
        return lines[0].strip() if lines else "NVIDIA driver"
    return "NVIDIA device /dev/nvidia0" if Path("/dev/nvidia0").exists() else None


def pick_device(device: str | None, local_rank: int) -> torch.device:
    """``device`` as asked, else CUDA when usable; a GPU that torch cannot use is an error, not a CPU run.

    Raises:
        DeviceError: a GPU is present (driver loaded) but ``torch.cuda.is_available()`` is false,
            typically a driver older than the CUDA build of torch; ``device="cpu"`` runs anyway.
    """
    if device is not None and device.startswith("cpu"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    driver = nvidia_gpu_present()
    if driver or device is not None:
        raise DeviceError(
            f"a GPU is present ({driver or 'asked for with --device ' + device}) but torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}) cannot use it: the NVIDIA driver is probably older than that "
            "CUDA build. Update the driver, or pass --device cpu to train on the CPU knowingly."
        )
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """One line for the log: which device trains, and on what."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"device {device} ({props.name}, {props.total_memory / 2**30:.0f} GiB), "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    return f"device cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def _group_for(device: torch.device) -> Any:
    """The default group if its backend serves ``device``'s tensors, else a gloo group for them."""
    served = str(dist.get_backend_config())  # e.g. "cuda:nccl" or "cpu:gloo,cuda:gloo"
    types = {part.split(":")[0] for part in served.split(",")} if ":" in served else {"cpu", "cuda"}
    return dist.group.WORLD if device.type in types else dist.new_group(backend="gloo")


def setup_runtime(device: str | None = None) -> Runtime:
    """Pick the device and, under ``torchrun`` (WORLD_SIZE > 1), join the process group.

    On CUDA the group serves CUDA tensors with NCCL and CPU tensors with gloo; on CPU, gloo.
    ``device`` forces ``cpu`` or ``cuda``; default: CUDA if usable (see :func:`pick_device`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size == 1:
        return Runtime(dev, rank, world_size)
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world_size, _group_for(dev))


def teardown(runtime: Runtime) -> None:
    """Leave the process group, if any."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier(group=runtime.group)
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
        dist.barrier(group=runtime.group)


def rank_batch(batch_size: int, runtime: Runtime, key: str) -> int:
    """The per-rank share of a global ``batch_size`` (the recipe's batch holds under DDP, so its LR does too).

    Raises:
        ValueError: naming ``key`` when the batch does not split evenly over the ranks.
    """
    if batch_size % runtime.world_size:
        raise ValueError(f"{key}={batch_size} (the global batch) does not split over {runtime.world_size} processes")
    return batch_size // runtime.world_size


def sum_over_ranks(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """``values`` summed over every rank (in place, on the runtime's device)."""
    if runtime.distributed:
        dist.all_reduce(values, group=runtime.group)
    return values


def gather_shards(values: np.ndarray, n: int, runtime: Runtime) -> np.ndarray:
    """The ``n`` values that ranks computed for items ``rank::world_size``, back in item order, on every rank."""
    if not runtime.distributed:
        return values
    width = -(-n // runtime.world_size)
    mine = torch.zeros(width, dtype=torch.float64, device=runtime.device)
    mine[: len(values)] = torch.as_tensor(values, dtype=torch.float64, device=runtime.device)
    parts = [torch.empty_like(mine) for _ in range(runtime.world_size)]
    dist.all_gather(parts, mine, group=runtime.group)
    ordered = torch.stack(parts, dim=1).reshape(-1)  # item i came from rank i % world, position i // world
    return ordered[:n].cpu().numpy()


def mean_over_ranks(total: torch.Tensor, count: torch.Tensor, runtime: Runtime) -> float:
    """``sum(total) / sum(count)`` over every rank: one host sync, at the end of an epoch."""
    total_all, count_all = sum_over_ranks(torch.stack([total.double(), count.double()]), runtime).tolist()
    return total_all / max(1.0, count_all)


@torch.no_grad()
def update_bn(model: nn.Module, loader: Any, runtime: Runtime, amp: str, channels: int, channels_last: bool) -> None:
    """Recompute the batch-norm statistics of ``model`` (SWA weights) from ``loader``, as
    ``torch.optim.swa_utils.update_bn`` does, but under autocast and in channels_last, over the
    images the caller chose; under DDP each rank passes its share and the statistics are averaged."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch
    training = model.training
    model.train()
    for images, _ in loader:
        with autocast(runtime.device, amp):
            model(data.model_input(images, channels, runtime.device, channels_last))
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
        for stat in (bn.running_mean, bn.running_var):
            sum_over_ranks(stat, runtime).div_(runtime.world_size)
    model.train(training)


def compiled(net: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(net)`` when asked (checkpoints keep coming from the uncompiled module)."""
    return torch.compile(net) if enabled else net


def wrap_ddp(model: nn.Module, runtime: Runtime, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel over the runtime's group (the model itself when alone); with ``sync_bn``
    its batch norms use the statistics of the global batch (small per-GPU batches at 1024)."""
    if not runtime.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=runtime.group)
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=runtime.group)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 or fp16); a no-op on CPU or with ``amp='none'``."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


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
