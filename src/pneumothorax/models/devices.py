"""Where tensors run: the device, mixed precision, and the DDP process group with its collectives."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pneumothorax.io.config import Config, ConfigError
from pneumothorax.io.errors import DeviceError


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
    """Leave the process group, if any, once every rank got here."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier(group=runtime.group)
        dist.destroy_process_group()


@contextlib.contextmanager
def running(device: str | None = None) -> Iterator[Runtime]:
    """:func:`setup_runtime` for the block, :func:`teardown` when it ends well.

    When it fails, this rank leaves at once, without the barrier: the other ranks may be waiting in a
    collective (DDP's all-reduce) that this one will never join, and a barrier would hang every rank until
    the 30-minute watchdog. The process exits with the error; torchrun sees it and stops the others.
    """
    runtime = setup_runtime(device)
    yield runtime  # an error in the block propagates from here: no teardown, as said above
    teardown(runtime)


def barrier(runtime: Runtime) -> None:
    """Wait for every rank (no-op alone)."""
    if runtime.distributed:
        dist.barrier(group=runtime.group)


def check_batches(cfg: Config, world_size: int) -> None:
    """Every global batch of the recipe (each segmentation stage, the classifier) must split over ``world_size``
    processes: checked when a job starts, not hours later when the stage that does not split begins.

    Raises:
        ConfigError: naming every key that does not split, and the process count.
    """
    keys = {f"segmentation.stages[{k}].batch_size": stage.batch_size for k, stage in enumerate(cfg.segmentation.stages)}
    if cfg.classifier.enabled:
        keys["classifier.batch_size"] = cfg.classifier.batch_size
    bad = [f"{key}={batch}" for key, batch in keys.items() if batch % world_size]
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: a global batch must split evenly over the {world_size} processes (NPROC x NNODES); "
            f"use a multiple of {world_size}, or other NPROC"
        )


def rank_batch(batch_size: int, runtime: Runtime, key: str) -> int:
    """The per-rank share of a global ``batch_size`` (the recipe's batch holds under DDP, so its LR does too).

    Raises:
        ConfigError: naming ``key`` when the batch does not split evenly over the ranks.
    """
    if batch_size % runtime.world_size:
        raise ConfigError(f"{key}={batch_size} (the global batch) does not split over {runtime.world_size} processes")
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


def in_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model in channels_last when asked (``classifier/segmentation.channels_last``), on every device: its
    inputs follow (``datasets.model_input``)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def compiled(net: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(net)`` when asked (checkpoints keep coming from the uncompiled module). ``dynamic=False``: each
    stage's input size gets its own static graph, compiled once when the stage starts, instead of one slower
    dynamic-shape graph for every size."""
    return torch.compile(net, dynamic=False) if enabled else net


def fast_kernels(device: torch.device, deterministic: bool) -> None:
    """cuDNN's benchmark mode for inference as for training (the fastest kernel per input shape), unless the
    config asks for deterministic kernels."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with SyncBatchNorm layers over the default group (None), not runtime.group: SyncBatchNorm runs on
    CUDA only, whose tensors the default group serves, and a layer holding a group object cannot be deep-copied
    (the SWA and EMA copies) or pickled."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)


def wrap_ddp(model: nn.Module, runtime: Runtime, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel over the runtime's group (the model itself when alone); with ``sync_bn``
    its batch norms use the statistics of the global batch (small per-GPU batches at 1024)."""
    if not runtime.distributed:
        return model
    if sync_bn:
        model = sync_batchnorm(model)
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=runtime.group)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes bf16 natively (the avx512_bf16 or amx_bf16 flag), where ``cpu_bf16`` pays (1.5-1.6x on
    real_cpu's steps here, make bench-train); elsewhere oneDNN emulates it, slower than fp32. None where unreadable."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def autocast(device: torch.device, amp: str, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 or fp16) as ``amp`` says; on CPU bf16 only where ``cpu_bf16`` asks for it
    (fast on CPUs with avx512_bf16 or AMX, slow elsewhere, so never implied by ``amp``); else a no-op."""
    if device.type == "cpu" and cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
