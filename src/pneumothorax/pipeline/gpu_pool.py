"""One fold per GPU: run a command on free GPUs of a pool, queueing while all are taken.

``python -m pneumothorax.pipeline.gpu_pool --gpus 0,1,2,3 [--per-job N] -- COMMAND ...`` takes ``N``
GPUs of the list that no other job holds (an exclusive ``flock`` on ``<lock dir>/gpu<id>.lock`` each)
and then *becomes* the command (``exec``): the locks are held by the training process itself, for as
long as it runs, however it ends (the kernel drops a dead process's locks); no wrapper can die and free
a GPU under a running job. While every GPU is taken it waits.

GPU ids are positions in what this process may use: with ``CUDA_VISIBLE_DEVICES`` set outside (SLURM,
docker), ``--gpus 0,1`` are its first two entries, and the command gets those entries. The locks are
named after them (a physical index or a GPU UUID), in a folder every user of the machine shares
(``/tmp/pneumothorax-gpus``, world-writable and sticky, lock files mode 666), so two users never take
one GPU. ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes the indices those of ``nvidia-smi``. The command gets
``PNEUMOTHORAX_POOL_JOBS`` (how many jobs the pool runs at once), which ``data.workers: auto`` divides
the cores by. ``make -j4 train GPUS=0,1,2,3`` wraps every GPU job (training, OOF, test inference,
prediction) in it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from pneumothorax.io import processes
from pneumothorax.io.errors import PipelineError

POLL_SECONDS = 0.2


class PoolError(PipelineError, RuntimeError):
    """A pool that cannot be used as asked; the message says what to change."""


def default_lock_dir() -> Path:
    """One folder for every user of this machine."""
    return Path(tempfile.gettempdir()) / "pneumothorax-gpus"


def _shared_dir(lock_dir: Path) -> None:
    """The lock folder, world-writable and sticky (as /tmp) when this user creates it."""
    if not lock_dir.exists():
        lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            os.chmod(lock_dir, 0o1777)


def visible(gpus: list[str], env: Mapping[str, str]) -> list[str]:
    """The device entries that pool ids ``gpus`` stand for: positions in ``CUDA_VISIBLE_DEVICES`` when it is set.

    Raises:
        PoolError: an id past the visible GPUs, naming them.
    """
    outer = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" not in env:
        return list(gpus)
    out = []
    for gpu in gpus:
        if not gpu.isdigit() or int(gpu) >= len(outer):
            raise PoolError(
                f"GPUS id {gpu} is not one of the {len(outer)} GPU(s) this job may use "
                f"(CUDA_VISIBLE_DEVICES={','.join(outer) or 'empty'}): ids count from 0 within that list"
            )
        out.append(outer[int(gpu)])
    return out


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        raise PoolError(
            f"{path}: another user's lock file that this user may not open; ask its owner to `chmod 666` it, or set "
            "GPU_LOCKS to a folder every user can write"
        ) from None
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, 0o666)  # the next user opens it too (the umask took bits away)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def claimed(devices: list[str], per_job: int, lock_dir: Path, say: bool = True) -> Iterator[dict[str, int]]:
    """Hold ``per_job`` free devices of ``devices`` for the block (waiting while too few are free): device -> fd."""
    if not 1 <= per_job <= len(devices):
        raise PoolError(f"a job needs {per_job} GPU(s) but the pool has {len(devices)}: {','.join(devices)}")
    _shared_dir(lock_dir)
    held: dict[str, int] = {}
    waited = False
    try:
        while len(held) < per_job:
            for device in devices:
                if device in held or len(held) == per_job:
                    continue
                fd = _try_lock(lock_dir / f"gpu{device}.lock")
                if fd is not None:
                    held[device] = fd
            if len(held) < per_job:
                for fd in held.values():  # never sit on a partial claim: two jobs could block each other
                    os.close(fd)
                held.clear()
                if say and not waited:
                    print(f"waiting for {per_job} free GPU(s) of {','.join(devices)}", file=sys.stderr, flush=True)
                waited = True
                time.sleep(POLL_SECONDS)
        yield held
    finally:
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def job_env(env: Mapping[str, str], mine: list[str], jobs: int) -> dict[str, str]:
    """The command's environment: its GPUs, in nvidia-smi's order, and how many jobs share the machine."""
    gpus = {"CUDA_VISIBLE_DEVICES": ",".join(mine), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    return {**env, **gpus, processes.POOL_JOBS: str(jobs)}


def run(command: list[str], gpus: list[str], per_job: int = 1, lock_dir: Path | None = None) -> None:
    """Claim the GPUs, then replace this process by ``command`` with the locks still held (never returns)."""
    devices = visible(gpus, os.environ)
    with claimed(devices, per_job, lock_dir or default_lock_dir()) as held:
        for fd in held.values():
            os.set_inheritable(fd, True)  # the command holds them from now on
        mine = list(held)
        print(f"GPU {','.join(mine)}: {' '.join(command)}", file=sys.stderr, flush=True)
        os.execvpe(command[0], command, job_env(os.environ, mine, max(1, len(gpus) // per_job)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", required=True, help="comma-separated GPU ids of the pool, e.g. 0,1,2,3")
    p.add_argument("--per-job", type=int, default=1, help="GPUs one job takes (its torchrun processes)")
    p.add_argument("--lock-dir", type=Path, default=None, help="lock folder (default: /tmp/pneumothorax-gpus)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command after --")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    try:
        run(command, gpus, args.per_job, args.lock_dir)
    except PoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # exec failed: no such command
        print(f"error: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0


if __name__ == "__main__":
    sys.exit(main())
