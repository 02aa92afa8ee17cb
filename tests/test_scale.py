"""Downscaling: one rule (a chain of exact halvings, then area) for caches and raw files."""

from __future__ import annotations

import cv2
import numpy as np

from pneumothorax.io import resize


def _area(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def test_pyramid_halves_then_matches_each_downscale():
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)
    levels = resize.pyramid(image, [1024, 512, 256, 384])
    assert levels[1024] is image
    assert (levels[512] == _area(image, 512)).all()
    assert (levels[256] == _area(_area(image, 512), 256)).all()  # through 512, not in one step
    assert (levels[384] == _area(image, 384)).all()  # no halving reaches 384
    for size, small in levels.items():
        assert small.shape == (size, size) and (small == resize.downscale(image, size)).all()
        assert np.abs(small.astype(int) - _area(image, size)).max() <= 1  # rounding twice: one grey level
    assert np.abs(levels[256].astype(int) - _area(image, 256)).max() == 1  # and it does differ somewhere


def test_non_square_is_one_area_resize():
    image = np.random.default_rng(1).integers(0, 256, (600, 800), dtype=np.uint8)
    assert (resize.downscale(image, 100) == _area(image, 100)).all()


def test_mask_pyramid_keeps_half_covered_pixels():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255  # left half
    mask[0, 4] = 255  # one more pixel: block (0, 2) at 4x4 is 1/4 covered
    mask[0:2, 6:8] = 255  # block (0, 3) at 4x4 is fully covered
    out = resize.mask_pyramid(mask, [8, 4, 2])
    assert out[8].dtype == np.uint8 and (out[8] == (mask > 0)).all()
    assert out[4][:, :2].all() and out[4][0, 3] == 1 and out[4][0, 2] == 0 and out[4][1:, 2:].sum() == 0
    assert (out[2] == np.array([[1, 0], [1, 0]])).all()
