"""Augmentation pipelines (the 2ST-UNet groups A1-A4, CLAHE; the classifier's). The per-sample random state
that makes them the same whichever worker or rank loads a sample is :mod:`pneumothorax.data.sample_augment`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np


def _expected_max(n: int) -> float:
    """The expected largest of ``n`` absolute standard normal draws (extreme-value approximation)."""
    root = math.sqrt(2.0 * math.log(n))
    return root - (math.log(math.log(n)) + math.log(4.0 * math.pi)) / (2.0 * root)


class SmoothElastic(A.DualTransform):
    """Albumentations' ``ElasticTransform`` (Gaussian noise over its maximum, blurred with ``sigma``, times
    ``alpha``, then ``remap``) with the field drawn at ``1/k`` of the size and upsampled.

    A blur of width ``sigma`` leaves nothing finer than ``sigma`` in the field, so drawing it on a
    grid ``k`` times coarser (``sigma / k`` about 4 pixels) and resizing bilinearly gives a field
    with the same amplitude and smoothness; the amplitude is kept by dividing by ``k`` (a blur of
    white noise shrinks it in proportion to its width) and normalising by the maximum a
    full-size draw would have. At 1024 it measured 15 against 258 ms per image and mask.
    """

    def __init__(self, alpha: float, sigma: float, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.alpha, self.sigma = alpha, sigma

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        """The remap coordinates of one draw."""
        height, width = params["shape"][:2]
        k = max(1, int(self.sigma // 4))
        small = (2, -(-height // k) + 1, -(-width // k) + 1)
        noise = self.random_generator.standard_normal(small, dtype=np.float32)
        full_max = _expected_max(2 * height * width)  # what albumentations divides a full-size draw by
        fields = [
            cv2.resize(cv2.GaussianBlur(n, (0, 0), self.sigma / k, borderType=cv2.BORDER_REPLICATE), (width, height))
            * np.float32(self.alpha / (k * full_max))
            for n in noise
        ]
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return {"map_x": grid_x + fields[0], "map_y": grid_y + fields[1]}

    def apply(self, img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: object) -> np.ndarray:
        """The image, resampled bilinearly (zeros outside, as the original)."""
        return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def apply_to_mask(self, mask: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: object) -> np.ndarray:
        """The mask, resampled by nearest neighbour (stays 0/1)."""
        return cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """For albumentations' serialisation."""
        return ("alpha", "sigma")


def augmentation_groups(size: int, p: float) -> dict[str, A.BasicTransform]:
    """The 2ST-UNet paper's groups (A1-A4), CLAHE and the 1st place's shift-scale-rotate (SSR), each applied with
    probability ``p``."""
    lo = max(8, int(round(0.75 * size)))
    return {
        "A1": A.HorizontalFlip(p=0.5),
        "A2": A.OneOf(
            [
                A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2, p=1.0),
                A.RandomGamma(gamma_limit=(80, 120), p=1.0),
                A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.0, p=1.0),
            ],
            p=p,
        ),
        "A3": A.OneOf(
            [
                SmoothElastic(alpha=size / 4, sigma=max(1.0, size / 40), p=1.0),
                A.GridDistortion(p=1.0),
                A.OpticalDistortion(distort_limit=0.1, p=1.0),
            ],
            p=p,
        ),
        "A4": A.RandomSizedCrop(min_max_height=(lo, size), size=(size, size), p=p),
        "CLAHE": A.CLAHE(p=p),
        # the 1st place's ShiftScaleRotate (albumentations' old defaults: 6.25% shift, 10% scale, 45 degrees)
        "SSR": A.Affine(
            translate_percent=(-0.0625, 0.0625),
            scale=(0.9, 1.1),
            rotate=(-45, 45),
            border_mode=cv2.BORDER_REFLECT_101,
            p=p,
        ),
    }


def segmentation_augment(names: Sequence[str], size: int, p: float) -> A.Compose:
    """An albumentations pipeline from group names (unknown names list the valid ones)."""
    groups = augmentation_groups(size, p)
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise ValueError(f"unknown augmentation group {unknown[0]!r}; choose from {sorted(groups)}")
    return A.Compose([groups[n] for n in names])


def classifier_augment(size: int, p: float) -> A.Compose:
    """Aggressive image-level augmentation: flip, zoom in and out, CLAHE."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.8, 1.2),
                translate_percent=(-0.05, 0.05),
                rotate=(-10, 10),
                p=p,
                border_mode=cv2.BORDER_CONSTANT,
            ),
            A.CLAHE(p=p),
            A.RandomBrightnessContrast(p=p),
        ]
    )
