"""Atomic file writes (``name.tmp`` beside the target, then ``os.replace``), locks, and write errors that say why."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class WriteError(OSError):
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


def create_npy(path: str | Path, dtype: Any, shape: tuple[int, ...], align: int = 4096) -> int:
    """Create a zero-filled (sparse) ``.npy`` file of ``shape``; return the byte offset of its data.

    The header is padded so that the data starts at ``align`` bytes (a page): rows of a
    power-of-two size then start on page boundaries, which makes writing them about a third
    cheaper, and reading a row touches no extra page. ``np.load`` reads it as usual.
    """
    dtype = np.dtype(dtype)
    header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    prefix = np.lib.format.MAGIC_PREFIX + bytes([1, 0])
    length = align - len(prefix) - 2
    if len(header) + 1 > length:
        raise ValueError(f"{path}: .npy header of {len(header)} bytes does not fit in {align}")
    body = (header + " " * (length - len(header) - 1) + "\n").encode("latin1")
    with open(path, "wb") as fh:
        fh.write(prefix + length.to_bytes(2, "little") + body)
        fh.truncate(align + int(np.prod(shape)) * dtype.itemsize)
    return align


def npy_data_offset(path: str | Path) -> int:
    """Byte offset of the data in an existing ``.npy`` file (after its header)."""
    array = np.load(path, mmap_mode="r")
    offset = int(array.offset)
    del array
    return offset


def reserve(path: str | Path, ranges: Iterable[tuple[int, int]]) -> None:
    """Allocate disk blocks for ``(offset, length)`` ranges of a sparse file before it is written.

    Writing into a hole makes the filesystem allocate blocks page by page, which costs more
    than the copy itself (ext4 here: 1.4 ms against 0.17 ms per MB); a full disk also fails
    here, with an error, instead of halfway through. Filesystems without ``fallocate`` are
    left sparse.
    """
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + length - merged[-1][0])
        else:
            merged.append([offset, length])
    if not merged or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in merged:
            try:
                os.posix_fallocate(fd, offset, length)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return
                raise OSError(exc.errno, f"{path}: cannot reserve {length} bytes ({exc.strerror})") from None
    finally:
        os.close(fd)


class RowWriter:
    """Writes rows of ``.npy`` files in place with ``pwrite`` (no memory map, no page faults).

    Keys are ``(path, data offset)``; row ``i`` of an array whose rows are ``row.nbytes`` long
    lands at ``offset + i * row.nbytes``. Used by worker processes, each with its own handles.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def write(self, path: str, offset: int, index: int, row: np.ndarray) -> None:
        """Write ``row`` (C-contiguous, the array's dtype) as row ``index``."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDWR)
        data = np.ascontiguousarray(row)
        written = os.pwrite(fd, data, offset + index * data.nbytes)
        if written != data.nbytes:
            raise OSError(f"{path}: short write of row {index} ({written} of {data.nbytes} bytes)")

    def read(self, path: str, offset: int, index: int, nbytes: int) -> np.ndarray:
        """Row ``index`` (``nbytes`` long, uint8) of the ``.npy`` data that starts at ``offset``."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDWR)
        data = os.pread(fd, nbytes, offset + index * nbytes)
        if len(data) != nbytes:
            raise OSError(f"{path}: short read of row {index} ({len(data)} of {nbytes} bytes)")
        return np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        """Close every handle."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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


def markdown_table(columns: Iterable[str], rows: Iterable[Iterable[Any]], digits: int | None = None) -> str:
    """A GitHub-markdown table; missing values (None, NaN) are blank, floats get ``digits`` decimals."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):  # NaN is the one value unequal to itself
            return ""
        return f"{value:.{digits}f}" if digits is not None and isinstance(value, float) else str(value)

    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
