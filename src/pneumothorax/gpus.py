"""One fold per GPU: run a command on free GPUs of a pool, queueing while all are taken.

``python -m pneumothorax.gpus --gpus 0,1,2,3 [--per-job N] -- COMMAND ...`` takes ``N`` GPUs of
the list that no other job holds (an exclusive ``flock`` on ``<lock dir>/gpu<id>.lock`` each),
runs the command with ``CUDA_VISIBLE_DEVICES`` set to them, and frees them when it ends, however
it ends (the kernel drops a dead process's locks). While every GPU is taken it waits. ``make -j4
train GPUS=0,1,2,3`` wraps every training job in it, so 5 folds (and the classifier folds) queue
on 4 GPUs. The lock folder is shared by every ``make`` on the machine (``GPU_LOCKS``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

POLL_SECONDS = 0.2


def default_lock_dir() -> Path:
    """One folder per user on this machine."""
    return Path(tempfile.gettempdir()) / f"pneumothorax-gpus-{os.getuid()}"


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def claimed(gpus: list[str], per_job: int, lock_dir: Path, say: bool = True) -> Iterator[list[str]]:
    """Hold ``per_job`` free GPUs of ``gpus`` for the block (waiting while too few are free)."""
    if not 1 <= per_job <= len(gpus):
        raise ValueError(f"a job needs {per_job} GPU(s) but the pool has {len(gpus)}: {','.join(gpus)}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: dict[str, int] = {}
    waited = False
    try:
        while len(held) < per_job:
            for gpu in gpus:
                if gpu in held or len(held) == per_job:
                    continue
                fd = _try_lock(lock_dir / f"gpu{gpu}.lock")
                if fd is not None:
                    held[gpu] = fd
            if len(held) < per_job:
                for fd in held.values():  # never sit on a partial claim: two jobs could block each other
                    os.close(fd)
                held.clear()
                if say and not waited:
                    print(f"waiting for {per_job} free GPU(s) of {','.join(gpus)}", file=sys.stderr, flush=True)
                waited = True
                time.sleep(POLL_SECONDS)
        yield list(held)
    finally:
        for fd in held.values():
            os.close(fd)


def run(command: list[str], gpus: list[str], per_job: int = 1, lock_dir: Path | None = None) -> int:
    """Run ``command`` on claimed GPUs; its exit status."""
    with claimed(gpus, per_job, lock_dir or default_lock_dir()) as mine:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(mine)}
        print(f"GPU {','.join(mine)}: {' '.join(command)}", file=sys.stderr, flush=True)
        return subprocess.call(command, env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", required=True, help="comma-separated GPU ids of the pool, e.g. 0,1,2,3")
    p.add_argument("--per-job", type=int, default=1, help="GPUs one job takes (its torchrun processes)")
    p.add_argument("--lock-dir", type=Path, default=None, help="shared lock folder (default: per user, in /tmp)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command after --")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    try:
        return run(command, gpus, args.per_job, args.lock_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
