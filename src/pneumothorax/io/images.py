"""Reading any chest X-ray file the pipeline accepts: DICOM, PNG or JPEG, as 8-bit grey pixels.

DICOM goes through :func:`pneumothorax.io.dicom.read` (LUTs, MONOCHROME1, bit depth). PNG and JPEG
are read with OpenCV: colour is converted to grey, 16-bit images are stretched to their own range.
The image id of a file is its stem, as for the competition's DICOMs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pneumothorax.io import dicom
from pneumothorax.io.errors import PipelineError


class ImageError(PipelineError, ValueError):
    """A file that cannot be read as an image; the message names the path and the reason."""


def to_uint8(raw: np.ndarray) -> np.ndarray:
    """A decoded PNG/JPEG as 8-bit grey: colour converted, more than 8 bits stretched to the image's range."""
    if raw.ndim == 3:
        raw = cv2.cvtColor(raw, cv2.COLOR_BGRA2GRAY if raw.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if raw.dtype != np.uint8:
        low, high = float(raw.min()), float(raw.max())
        raw = np.round((raw.astype(np.float64) - low) * (255.0 / max(high - low, 1.0))).astype(np.uint8)
    return np.ascontiguousarray(raw)


def read(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Any accepted file as ``(uint8 pixels, meta)``; meta as :func:`pneumothorax.io.dicom.read`'s for a DICOM,
    else the image id, rows and columns.

    Raises:
        ImageError or DicomError: naming the path and the reason.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return dicom.read(path)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ImageError(f"{path}: not a readable image")
    pixels = to_uint8(raw)
    return pixels, {"image_id": path.stem, "rows": pixels.shape[0], "columns": pixels.shape[1]}
