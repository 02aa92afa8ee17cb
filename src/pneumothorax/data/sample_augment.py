"""One sample's augmentation randomness: its key, its random state, and a transform applied under it.

Apart from :mod:`pneumothorax.data.augmentations` (the albumentations pipelines) so that the datasets, which
every inference process loads, load no albumentations (about 0.6 s of a start).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for the annotation only: an inference process never builds a transform
    import albumentations as A


SampleKey = tuple[int, int, int]  # (sampler seed, epoch, position in the epoch's global order)


def augment_state(key: SampleKey) -> tuple[np.random.Generator, random.Random]:
    """The random state of one sample's augmentation: one NumPy stream, and a Python one drawn from it.

    Every transform of a pipeline draws from these same two streams in turn, so the groups are
    applied independently of each other; the key depends neither on the DataLoader worker nor
    on the DDP rank that loads the sample, so a resumed or distributed run sees the same stream.
    """
    rng = np.random.default_rng([int(k) for k in key])
    return rng, random.Random(int(rng.integers(2**63)))


def apply_augment(transform: A.Compose, key: SampleKey, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``transform`` on ``arrays`` with the random state of sample ``key``."""
    transform.set_random_state(*augment_state(key))
    return transform(**arrays)
