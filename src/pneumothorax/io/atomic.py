"""Atomic file writes (``name.tmp`` beside the target, then ``os.replace``), locks, and write errors that say why."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pneumothorax.io.errors import PipelineError


class WriteError(PipelineError, OSError):
    """An output that could not be written: the message names the file and the free space."""


# errno values that mean "this output cannot be written here" rather than a bug
_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
}


def free_space(path: str | Path) -> str:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent), readable."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown free space"
    return f"{free / 2**30:.2f} GiB free on the disk holding {probe}"


def write_error(path: str | Path, exc: BaseException) -> WriteError | None:
    """A :class:`WriteError` for ``exc`` if it means a full disk or an unwritable place, else None.

    torch reports a full disk while saving as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos`` or a ``PytorchStreamWriter`` failure.
    """
    if isinstance(exc, WriteError):
        return exc
    text = str(exc)
    is_write = isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS
    is_torch = isinstance(exc, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter" in text)
    if not (is_write or is_torch):
        return None
    reason = (
        exc.strerror
        if isinstance(exc, OSError) and exc.strerror
        else text.splitlines()[0]
        if text
        else type(exc).__name__
    )
    return WriteError(errno.ENOSPC, f"{path}: could not write ({reason}); {free_space(path)}")


def tmp_path(path: Path) -> Path:
    """The temporary sibling that an atomic write of ``path`` uses."""
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path``, on error it is removed.

    A full disk or an unwritable place raises :class:`WriteError` naming ``path`` and the free space.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        translated = write_error(path, exc)
        if translated is None:
            raise
        raise translated from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON (indented, sorted keys) atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_csv(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text_if_changed(path: str | Path, text: str) -> bool:
    """Write text atomically unless the file already holds exactly it (its time then stays); True if written."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save one array atomically (``np.save`` appends ``.npy`` to names, so write a handle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def locked(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block; say so, then wait, while another process holds it.

    ``flock`` locks end with their process, so a killed holder never leaves a stale lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            print(f"waiting: {what} is in use by {holder} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)
