"""Submissions: post-process test predictions, encode, validate, write atomically; and scoring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumothorax.data import prepared
from pneumothorax.io import atomic, metric, progress_bars, rle
from pneumothorax.io.errors import PipelineError
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.post import postprocess
from pneumothorax.post.postprocess import PostProcess

HEADER = ("ImageId", "EncodedPixels")


class SubmissionError(PipelineError, ValueError):
    """A submission that must not be written or scored; the message names the id or row."""


def validate(frame: pd.DataFrame, expected_ids: list[str], source: str = "the test set") -> None:
    """Every expected id exactly once, no other id, no NaN, every RLE decodable within 1024x1024.

    Nothing is ever silently empty: a submission of zero rows is refused.
    """
    if not len(frame) or not expected_ids:
        raise SubmissionError(
            f"nothing to submit: {source} has no image (a training-only run, TEST_DIR=none?); "
            "refusing to write zero rows"
        )
    if list(frame.columns) != list(HEADER):
        raise SubmissionError(f"header {list(frame.columns)} != {list(HEADER)}")
    if frame.isna().any().any():
        bad = frame[frame.isna().any(axis=1)].index[0]
        raise SubmissionError(f"row {bad + 2}: NaN value")
    duplicated = frame["ImageId"][frame["ImageId"].duplicated()]
    if len(duplicated):
        raise SubmissionError(f"image {duplicated.iloc[0]} appears more than once")
    missing = sorted(set(expected_ids) - set(frame["ImageId"]))
    if missing:
        raise SubmissionError(f"{len(missing)} image(s) of {source} missing, e.g. {missing[0]}")
    extra = sorted(set(frame["ImageId"]) - set(expected_ids))
    if extra:
        raise SubmissionError(f"{len(extra)} image id(s) not in {source}, e.g. {extra[0]}")
    for i, (image_id, value) in enumerate(zip(frame["ImageId"], frame["EncodedPixels"], strict=True)):
        try:
            rle.parse(str(value), rle.SHAPE)
        except rle.RLEError as exc:
            raise SubmissionError(f"row {i + 2} (image {image_id}): {exc}") from None


def write(frame: pd.DataFrame, path: Path, expected_ids: list[str], source: str = "the test set") -> Path:
    """Validate, then write atomically."""
    validate(frame, expected_ids, source)
    atomic.write_csv(path, frame)
    return path


def encode(
    maps: np.ndarray,
    rows: Sequence[int],
    gates: Sequence[float | None],
    post: PostProcess,
    desc: str,
    progress: bool = True,
) -> list[str]:
    """The RLE of each map row (``-1`` for a row of -1: an image that failed to decode), through
    :meth:`PostProcess.apply` at 1024x1024: what a submission holds, and what OOF re-scoring scores."""
    out = []
    for row, gate in progress_bars.bar(zip(rows, gates, strict=True), desc, progress, total=len(rows), unit="image"):
        out.append(rle.EMPTY if row < 0 else rle.encode(post.apply(np.asarray(maps[row]), gate)))
    return out


def make_submission(exp: ExperimentDir, processed: ProcessedDir, out_path: Path, progress: bool = True) -> pd.DataFrame:
    """Apply the searched post-processing to the test predictions and write the submission.

    One row per test image, ``-1`` for empty, and ``-1`` for an image that failed to decode;
    relative column-major RLE (the format of both stages). When the layout has a sample
    submission, the rows are exactly its ids, in its order.
    """
    post, _ = postprocess.load(exp.postprocess)
    ids = pd.read_csv(exp.test_ids, dtype={"image_id": str}, keep_default_na=False)
    gate = pd.read_csv(exp.test_gate, dtype={"image_id": str})
    gate_of = dict(zip(gate["image_id"], gate["prob"], strict=True))
    maps = np.load(exp.test_maps, mmap_mode="r")
    gates = [gate_of.get(image_id) for image_id in ids["image_id"]]
    encoded = encode(maps, ids["row"].to_numpy(), gates, post, "submission", progress)
    frame = pd.DataFrame({HEADER[0]: ids["image_id"], HEADER[1]: encoded})
    expected, sample = prepared.expected_test_ids(processed.root)
    if sample is not None:  # the sample's order; an id it lacks stays, for validate() to name
        order = {image_id: k for k, image_id in enumerate(expected)}
        frame = frame.sort_values("ImageId", key=lambda ids: ids.map(order).fillna(len(order)), kind="stable")
        frame = frame.reset_index(drop=True)
    write(frame, out_path, expected, f"the sample submission {sample}" if sample else "the prepared test set")
    return frame


def score_rows(pred: dict[str, list[str]], truth: dict[str, list[str]]) -> dict[str, Any]:
    """The competition metric of predicted RLE rows against true ones (both: image id -> rows, union), at
    1024x1024, with a breakdown: score, all_empty_score, dice_positive, dice_negative, positives_found
    (positive images with a predicted mask), false_positive_images, n_images, n_positive. Every image of
    ``truth`` must be in ``pred``."""
    dices, positive, fp, found = [], [], 0, 0
    for image_id, rows in truth.items():
        t = rle.decode_union(rows) if rows else None
        p = rle.decode_union(pred[image_id]) if pred[image_id] else None
        t_area = int(t.sum()) if t is not None else 0
        p_area = int(p.sum()) if p is not None else 0
        inter = int(np.logical_and(t, p).sum()) if t is not None and p is not None else 0
        dices.append(float(metric.dice_from_counts(inter, p_area, t_area)))
        positive.append(t_area > 0)
        fp += int(t_area == 0 and p_area > 0)
        found += int(t_area > 0 and p_area > 0)
    dices_a, pos = np.asarray(dices), np.asarray(positive)
    return {
        "score": float(dices_a.mean()),
        "all_empty_score": float((~pos).mean()),
        "dice_positive": float(dices_a[pos].mean()) if pos.any() else float("nan"),
        "dice_negative": float(dices_a[~pos].mean()) if (~pos).any() else float("nan"),
        "positives_found": found,
        "false_positive_images": fp,
        "n_images": len(dices),
        "n_positive": int(pos.sum()),
    }


def score(submission: Path, labels: Path) -> dict[str, Any]:
    """Competition score of a submission against a labels CSV, with a breakdown.

    Returns score, all_empty_score, dice_positive, dice_negative, false_positive_images,
    n_images, n_positive. Every labelled image must be in the submission.
    """
    truth = rle.read_labels(labels, rle.SHAPE)
    try:
        pred = rle.group_labels(rle.read_label_rows(submission, rle.SHAPE))
    except rle.RLEError as exc:
        raise SubmissionError(str(exc)) from None
    missing = sorted(set(truth) - set(pred))
    if missing:
        raise SubmissionError(f"{submission}: {len(missing)} labelled image(s) missing, e.g. {missing[0]}")
    return score_rows(pred, truth)
