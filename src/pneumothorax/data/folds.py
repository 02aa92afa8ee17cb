"""An experiment's ``folds.csv`` read back: per-fold counts, and which split a run was trained on.

Making the split (scikit-learn) is :mod:`pneumothorax.data.splitting`, kept apart so that training loads no
scikit-learn (about a second of every training process's start)."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from pneumothorax.io.errors import PipelineError
from pneumothorax.io.paths import RunDir


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: images, patients, positives and the positive rate."""
    grouped = folds.groupby("fold")
    return pd.DataFrame(
        {
            "images": grouped.size(),
            "patients": grouped["patient"].nunique(),
            "positive": grouped["has_pneumothorax"].sum(),
            "positive_rate": grouped["has_pneumothorax"].mean().round(4),
        }
    )


def split_hash(folds: pd.DataFrame, fold: int) -> str:
    """A hash of the images a fold trains on and validates on: a run records it, and its
    out-of-fold output is refused against any other split."""
    valid = sorted(folds.loc[folds["fold"] == fold, "image_id"].astype(str))
    train = sorted(folds.loc[folds["fold"] != fold, "image_id"].astype(str))
    text = "\n".join(valid) + "\n--\n" + "\n".join(train)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SplitError(PipelineError, ValueError):
    """A run trained on another split than the experiment's: its held-out images are not held out any more."""


def check_split(run: RunDir, folds: pd.DataFrame, fold: int) -> None:
    """Refuse a finished run's out-of-fold use when the experiment's split (``folds.csv``) is no longer the one it
    trained on (what its ``trained_under.json`` records). Reads no weights: the search needs no torch.

    Raises:
        SplitError: naming the run and what to do.
    """
    split = split_hash(folds, fold)
    try:
        trained_on = json.loads(run.trained_under.read_text()).get("split")
    except (OSError, ValueError):
        trained_on = None
    if trained_on != split:
        raise SplitError(
            f"{run.root}: trained on another split than the experiment's folds.csv (recorded {trained_on}, "
            f"now {split}); its out-of-fold output would score images it trained on. Run `make train` to retrain it."
        )
