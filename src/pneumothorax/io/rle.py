"""Run-length encoding in the SIIM-ACR competition format.

The competition's RLE is a list of ``offset length`` pairs over the *column-major*
(transposed) flattening of the image: flat index ``col * H + row``. In the default
*relative* format each offset counts from the end of the previous run (the first one is
absolute and 0-based); the *absolute* format gives 0-based starts. ``-1`` means an empty
mask. An image may have several label rows: its mask is their union.

Unlike the competition's reference ``mask2rle``, :func:`encode` keeps a run that reaches
the last pixel.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from pneumothorax.io.errors import PipelineError

EMPTY = "-1"
SHAPE = (1024, 1024)


class RLEError(PipelineError, ValueError):
    """A malformed RLE string or label row."""


@numba.njit(cache=True, nogil=True)
def _parse_ints(buf: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Parse space-separated integers from ASCII bytes: (values, status, byte position).

    status 0 = ok, 1 = a character that is not a digit or a space, 2 = a negative number.
    """
    out = np.empty(buf.shape[0] // 2 + 1, dtype=np.int64)
    n = 0
    i = 0
    size = buf.shape[0]
    while i < size:
        ch = buf[i]
        if ch == 32 or ch == 9:
            i += 1
            continue
        if ch == 45:  # '-'
            return out[:n], 2, i
        if ch < 48 or ch > 57:
            return out[:n], 1, i
        value = 0
        while i < size and 48 <= buf[i] <= 57:
            value = value * 10 + (buf[i] - 48)
            i += 1
        if i < size and buf[i] != 32 and buf[i] != 9:
            return out[:n], 1, i
        out[n] = value
        n += 1
    return out[:n], 0, i


def parse(rle: str, shape: tuple[int, int] = SHAPE, relative: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate an RLE string and return its runs as absolute ``(starts, ends)`` arrays.

    Raises:
        RLEError: non-integer or negative numbers, an odd token count, zero-length runs,
            or runs that go past the image.
    """
    text = rle.strip()
    if text in (EMPTY, ""):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    try:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        raise RLEError("non-ASCII character") from None
    values, status, pos = _parse_ints(raw)
    if status:
        token = text[pos:].split(maxsplit=1)[0] if text[pos:].strip() else text[pos]
        reason = "negative number" if status == 2 else "non-integer token"
        raise RLEError(f"{reason} {token!r} at character {pos}")
    if values.size % 2:
        raise RLEError(f"odd number of tokens ({values.size})")
    offsets, lengths = values[0::2], values[1::2]
    if (lengths == 0).any():
        raise RLEError("zero-length run")
    if relative:
        ends = np.cumsum(offsets + lengths)
        starts = ends - lengths
    else:
        starts = offsets
        ends = offsets + lengths
    n_pixels = shape[0] * shape[1]
    if ends.max() > n_pixels:
        raise RLEError(f"run ends at pixel {int(ends.max())}, past the {shape[0]}x{shape[1]} image")
    return starts, ends


@numba.njit(cache=True, nogil=True)
def _fill(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    for i in range(starts.shape[0]):
        flat[starts[i] : ends[i]] = 1


def decode(rle: str, shape: tuple[int, int] = SHAPE, relative: bool = True) -> np.ndarray:
    """Decode one RLE string into a ``uint8`` 0/1 mask of ``shape`` (rows, columns)."""
    return decode_union([rle], shape, relative)


def decode_union(rles: Iterable[str], shape: tuple[int, int] = SHAPE, relative: bool = True) -> np.ndarray:
    """Decode several RLE rows of one image into the union of their masks."""
    height, width = shape
    flat = np.zeros(height * width, dtype=np.uint8)
    for rle in rles:
        starts, ends = parse(rle, shape, relative)
        _fill(flat, starts, ends)
    # Column-major: flat index = col * H + row.
    return flat.reshape(width, height).T


@numba.njit(cache=True, nogil=True)
def _runs_flat(flat: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a 1-D 0/1 array; ``words`` is the same memory as uint64, to skip 8 bytes at once."""
    size = flat.shape[0]
    starts = np.empty(size // 2 + 1, dtype=np.int64)
    lengths = np.empty_like(starts)
    full = np.uint64(0xFFFFFFFFFFFFFFFF)
    n_words = words.shape[0]
    n = 0
    i = 0
    inside = False
    while i < size:
        if (i & 7) == 0 and (i >> 3) < n_words:
            word = words[i >> 3]
            if (not inside and word == 0) or (inside and word == full):
                i += 8
                continue
        on = flat[i] != 0
        if on and not inside:
            starts[n] = i
            inside = True
        elif inside and not on:
            lengths[n] = i - starts[n]
            n += 1
            inside = False
        i += 1
    if inside:  # a run that reaches the last pixel is kept (the official encoder drops it)
        lengths[n] = size - starts[n]
        n += 1
    return starts[:n], lengths[:n]


@numba.njit(cache=True, nogil=True)
def _runs_2d(mask: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-major runs of a C-ordered mask, skipping the columns flagged empty in ``columns``."""
    height, width = mask.shape
    starts = np.empty(height * width // 2 + 1, dtype=np.int64)
    lengths = np.empty_like(starts)
    n = 0
    inside = False
    for c in range(width):
        base = c * height
        if columns[c] == 0:
            if inside:
                lengths[n] = base - starts[n]
                n += 1
                inside = False
            continue
        for r in range(height):
            on = mask[r, c] != 0
            if on and not inside:
                starts[n] = base + r
                inside = True
            elif inside and not on:
                lengths[n] = base + r - starts[n]
                n += 1
                inside = False
    if inside:  # a run that reaches the last pixel is kept (the official encoder drops it)
        lengths[n] = height * width - starts[n]
        n += 1
    return starts[:n], lengths[:n]


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absolute column-major ``(starts, lengths)`` of the foreground runs of a 2-D mask."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        mask = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
    transposed = mask.T
    if transposed.flags.c_contiguous:  # Fortran-ordered (e.g. from decode): one linear scan
        flat = transposed.reshape(-1)
        usable = flat.size - flat.size % 8
        words = flat[:usable].view(np.uint64)
        if not words.any() and not flat[usable:].any():  # empty: skip the scan
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        return _runs_flat(flat, words)
    mask = np.ascontiguousarray(mask)
    if mask.shape[1] % 8 == 0:
        columns = np.bitwise_or.reduce(mask.view(np.uint64), axis=0).view(np.uint8)
    else:
        columns = mask.any(axis=0).view(np.uint8)
    return _runs_2d(mask, np.ascontiguousarray(columns))


def encode(mask: np.ndarray, relative: bool = True) -> str:
    """Encode a 2-D mask (nonzero = foreground) as an RLE string; ``-1`` if empty."""
    starts, lengths = runs(mask)
    if starts.size == 0:
        return EMPTY
    offsets = starts.copy()
    if relative:
        offsets[1:] = starts[1:] - (starts[:-1] + lengths[:-1])
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2] = offsets
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


@dataclass(frozen=True)
class LabelRow:
    """One row of a label CSV: the image, its RLE and its 1-based line in the file."""

    image_id: str
    rle: str
    line: int


def _open_text(path: Path):
    """Text mode that drops a UTF-8 byte-order mark (Excel saves one), plain or gzipped."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, newline="", encoding="utf-8-sig")


def read_label_rows(
    path: str | Path, shape: tuple[int, int] = SHAPE, relative: bool = True, validate: bool = True
) -> list[LabelRow]:
    """Read a SIIM label CSV (``ImageId, EncodedPixels``; ``.csv`` or ``.csv.gz``).

    Header names and values are stripped of spaces, and a byte-order mark is dropped. Every
    RLE is validated unless ``validate`` is false.

    Raises:
        RLEError: naming the file, the line and the image id of a malformed row.
    """
    path = Path(path)
    rows: list[LabelRow] = []
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise RLEError(f"{path}: empty file, expected header 'ImageId,EncodedPixels'") from None
        if "ImageId" not in header or "EncodedPixels" not in header:
            raise RLEError(f"{path}: header {header} lacks 'ImageId' and 'EncodedPixels'")
        i_id, i_rle = header.index("ImageId"), header.index("EncodedPixels")
        for line, record in enumerate(reader, start=2):
            if not record or all(not v.strip() for v in record):
                continue
            if len(record) <= max(i_id, i_rle):
                raise RLEError(f"{path}: line {line}: expected {len(header)} fields, got {len(record)}")
            image_id, rle = record[i_id].strip(), record[i_rle].strip()
            if not image_id:
                raise RLEError(f"{path}: line {line}: empty ImageId")
            if not rle:
                raise RLEError(f"{path}: line {line} (image {image_id}): empty EncodedPixels (use -1)")
            if validate:
                try:
                    parse(rle, shape, relative)
                except RLEError as exc:
                    raise RLEError(f"{path}: line {line} (image {image_id}): {exc}") from None
            rows.append(LabelRow(image_id, rle, line))
    return rows


def group_labels(rows: Sequence[LabelRow]) -> dict[str, list[str]]:
    """Image id -> its non-empty RLE rows (``[]`` for a ``-1`` image), in file order."""
    out: dict[str, list[str]] = {}
    for row in rows:
        bucket = out.setdefault(row.image_id, [])
        if row.rle != EMPTY:
            bucket.append(row.rle)
    return out


def read_labels(path: str | Path, shape: tuple[int, int] = SHAPE) -> dict[str, list[str]]:
    """Read and validate a label CSV into image id -> list of RLE rows (union semantics)."""
    return group_labels(read_label_rows(path, shape))
