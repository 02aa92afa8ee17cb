"""Reading DICOM files into uint8 pixels and a small metadata dict: SIIM-ACR's and clinical ones.

Stored values go through what a viewer applies (Modality LUT, VOI LUT or window, MONOCHROME1
inversion) before they become 8 bits; PixelRepresentation and BitsStored are honoured. JPEG baseline
is decoded by OpenCV (the SIIM files: their caches are unchanged); JPEG Lossless, JPEG-LS, JPEG 2000
and RLE Lossless by pydicom's plugins (pylibjpeg, pyjpegls, pydicom). A file whose transfer syntax
no installed plugin decodes is an error naming the syntax.
"""

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
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import JPEGBaseline8Bit

from pneumothorax.io.errors import PipelineError

JPEG_SYNTAXES = {str(JPEGBaseline8Bit)}  # OpenCV; 12-bit JPEG goes to pydicom's plugins
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


class DicomError(PipelineError, ValueError):
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


def _stored_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """The stored values of the one frame, decoded by OpenCV (JPEG baseline) or pydicom's plugins.

    Raises:
        DicomError: naming the transfer syntax when no installed decoder reads it.
    """
    syntax = pydicom.uid.UID(str(getattr(ds.file_meta, "TransferSyntaxUID", "")))
    try:
        if syntax in JPEG_SYNTAXES:
            return _decode_jpeg(ds)
        return ds.pixel_array
    except Exception as exc:
        if syntax and not _decodable(syntax):
            raise DicomError(
                f"{path}: no decoder for its transfer syntax {syntax.name} ({syntax}); install the DICOM "
                "decoders (pip install 'pneumothorax[dicom]': pylibjpeg with its libjpeg and openjpeg plugins)"
            ) from None
        raise DicomError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None


def _decodable(syntax: pydicom.uid.UID) -> bool:
    """Whether an installed pydicom plugin decodes ``syntax``."""
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # pydicom knows no decoder for this syntax at all
        return False


def to_uint8(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> what a viewer shows, in 8 bits: the Modality LUT (rescale or LUT), then the VOI LUT or
    the first window, then MONOCHROME1 inverted.

    Without a VOI LUT or window, unsigned values with no modality transform keep their absolute level (the
    range of BitsStored maps to 0-255: an 8-bit file is unchanged); other values are stretched from their
    minimum to their maximum (a rescaled or signed range says nothing about where the body lies).
    """
    values = apply_modality_lut(stored, ds) if _has_modality_lut(ds) else stored
    if _has_voi_lut(ds):
        shown, low, high = _voi(values, ds)
    elif values is stored and int(ds.get("PixelRepresentation", 0)) == 0:
        shown, low, high = values, 0.0, float((1 << int(ds.get("BitsStored", 8))) - 1)
    else:
        shown, low, high = values, float(np.min(values)), float(np.max(values))
    if shown.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        out = shown
    else:
        scaled = (np.asarray(shown, dtype=np.float64) - low) * (255.0 / max(high - low, 1e-12))
        out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def _has_modality_lut(ds: pydicom.Dataset) -> bool:
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return "ModalityLUTSequence" in ds or (slope, intercept) != (1.0, 0.0)


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def _voi(values: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, float, float]:
    """The first VOI LUT (or window) applied, with the range of its output."""
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return apply_voi_lut(values, ds, index=0), 0.0, float((1 << bits) - 1)
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    # DICOM's linear window (PS3.3 C.11.2.1.2.1), onto [0, 1]
    shown = np.clip((np.asarray(values, dtype=np.float64) - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5, 0, 1)
    return shown, 0.0, 1.0


def _first(value: Any) -> float:
    """A window attribute's first value (a file may list several windows)."""
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


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
    pixels = _stored_pixels(path, ds)
    if pixels.ndim != 2:
        raise DicomError(f"{path}: expected one grayscale frame, got pixel array of shape {pixels.shape}")
    rows, cols = int(ds.get("Rows", pixels.shape[0])), int(ds.get("Columns", pixels.shape[1]))
    if pixels.shape != (rows, cols):
        raise DicomError(f"{path}: pixel array {pixels.shape} does not match Rows x Columns {rows}x{cols}")
    pixels = to_uint8(pixels, ds)
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
