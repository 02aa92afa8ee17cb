"""Downscaling images and masks to the working sizes, one rule for the caches and raw files.

Area interpolation, done as a chain of exact halvings where the target size allows it
(1024 -> 512 -> 256): OpenCV's INTER_AREA has a fast path for a factor of 2, and a 1024 -> 256
resize in one step costs 3x a 1024 -> 512 step (0.45 against 0.16 ms here). A halving chain
rounds at every step, so a pixel can differ by one grey level from a one-step area resize.
Masks go through the same chain scaled to 0/255 and are thresholded at 128: a low-resolution
mask pixel is set when about half or more of its area is pneumothorax.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np


def _can_halve(side: int, size: int) -> bool:
    return side % 2 == 0 and (side // 2) >= size and (side // 2) % size == 0


def _area(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def pyramid(image: np.ndarray, sizes: Iterable[int]) -> dict[int, np.ndarray]:
    """``image`` resized to ``size`` x ``size`` for every size, sharing the halvings between sizes.

    A square image is halved while the half is still a multiple of the size; the rest (a
    non-square image, a size that no halving reaches) is one area resize. A size equal to the
    image's returns the image itself.
    """
    height, width = image.shape[:2]
    levels = {height: image} if height == width else {}
    out: dict[int, np.ndarray] = {}
    for size in sizes:
        if height != width:
            out[size] = _area(image, size)
            continue
        side = height
        while _can_halve(side, size):
            if side // 2 not in levels:
                levels[side // 2] = _area(levels[side], side // 2)
            side //= 2
        out[size] = levels[side] if side == size else _area(levels[side], size)
    return out


def downscale(image: np.ndarray, size: int) -> np.ndarray:
    """One image at ``size`` x ``size`` (the rule of :func:`pyramid`)."""
    return pyramid(image, [size])[size]


def mask_pyramid(scaled: np.ndarray, sizes: Iterable[int]) -> dict[int, np.ndarray]:
    """``uint8`` 0/1 masks at every size from a 0/255 ``uint8`` mask (its own size passes through)."""
    return {size: (small >= 128).view(np.uint8) for size, small in pyramid(scaled, sizes).items()}
