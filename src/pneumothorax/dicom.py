"""Reading SIIM-ACR DICOM files into uint8 pixels and a small metadata dict."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

JPEG_SYNTAXES = {str(JPEGBaseline8Bit), str(JPEGExtended12Bit)}
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


class DicomError(ValueError):
    """A DICOM file that cannot be read; the message names the path and the reason."""


def _parse_age(value: Any) -> int | None:
    """PatientAge as years: the SIIM files store a bare number (``'10'``); DICOM says ``'062Y'``."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*0*(\d+)\s*([YMWD]?)\s*", str(value))
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2) or "Y"
    return {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """pydicom's value validation off for the block (and restored after).

    The SIIM files break two rules that pydicom reports once per file, on stderr: PatientAge
    is a bare number (``'62'``) and today's test files carry ``ID_0011fe81e`` as their
    SOPInstanceUID, which is not a UID. :func:`read` records the latter in its metadata
    (``sop_is_uid``), so that ``prepare`` can say it once for all files.
    """
    settings = pydicom_config.settings
    before = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = before


def is_uid(value: str) -> bool:
    """Whether ``value`` is a DICOM UID (digits and dots, at most 64 characters)."""
    return len(value) <= 64 and UID_PATTERN.fullmatch(value) is not None


def _decode_jpeg(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the single JPEG frame with OpenCV (libjpeg-turbo): faster than pydicom's plugins."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    pixels = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("JPEG frame could not be decoded")
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    return pixels


def _to_uint8(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    if pixels.dtype == np.uint8 and bits_stored <= 8:
        return pixels
    if bits_stored <= 8:
        return np.clip(pixels, 0, 255).astype(np.uint8)
    scale = 255.0 / float((1 << bits_stored) - 1)
    return np.clip(np.rint(pixels.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def read(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM file.

    Returns:
        ``(pixels, meta)``: pixels a ``uint8`` (rows, columns) array, MONOCHROME1 inverted,
        more than 8 stored bits scaled to 0-255; meta with image_id (the file stem),
        sop_instance_uid, sop_is_uid, patient_id, sex, age, view, rows, columns, pixel_spacing.

    Raises:
        DicomError: naming the path and the reason.
    """
    path = Path(path)
    with lenient():
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # pydicom raises many types on corrupt input
            raise DicomError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
        return _pixels_and_meta(path, ds)


def _pixels_and_meta(path: Path, ds: pydicom.Dataset) -> tuple[np.ndarray, dict[str, Any]]:
    if "PixelData" not in ds:
        raise DicomError(f"{path}: no PixelData element")
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
    try:
        pixels = _decode_jpeg(ds) if syntax in JPEG_SYNTAXES else ds.pixel_array
    except Exception as exc:
        raise DicomError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    if pixels.ndim != 2:
        raise DicomError(f"{path}: expected one grayscale frame, got pixel array of shape {pixels.shape}")
    rows, cols = int(ds.get("Rows", pixels.shape[0])), int(ds.get("Columns", pixels.shape[1]))
    if pixels.shape != (rows, cols):
        raise DicomError(f"{path}: pixel array {pixels.shape} does not match Rows x Columns {rows}x{cols}")
    pixels = _to_uint8(pixels, int(ds.get("BitsStored", 8)))
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        pixels = 255 - pixels
    spacing = ds.get("PixelSpacing")
    sop = str(ds.get("SOPInstanceUID", "")).strip()
    meta = {
        "image_id": path.stem,
        "sop_instance_uid": sop,
        "sop_is_uid": is_uid(sop),
        "patient_id": str(ds.get("PatientID", "")),
        "sex": str(ds.get("PatientSex", "")).strip() or None,
        "age": _parse_age(ds.get("PatientAge")),
        "view": str(ds.get("ViewPosition", "")).strip() or None,
        "rows": rows,
        "columns": cols,
        "pixel_spacing": float(spacing[0]) if spacing else None,
        "pixel_area_mm2": float(spacing[0]) * float(spacing[-1]) if spacing else None,  # row x column spacing
    }
    return np.ascontiguousarray(pixels), meta
