"""The post-processing decision as a value: what search returns, JSON saves, and ``apply`` replays.

A pixel is predicted where ``p > b_th``. An image is emptied when its gate score is below ``gate``
(the classifier's probability; with ``gate_blend`` w, ``(1 - w) * probability + w * peak``: the
segmenter's own confidence joins the gate; the peak is max p, or with ``gate_top`` f the mean p of the
map's highest fraction f of pixels, which ranks real images better than one pixel does), or when its
predicted area, counted in 1024x1024 pixels, is below ``r_th``
(R-TH). The 1st place's triplet rule (``rule="triplet"``) empties an image unless
``count(p > top)`` reaches ``area``, and then predicts ``p > bottom``. ``min_component`` drops
connected components smaller than that many 1024x1024 pixels. ``rule="empty"``: nothing beat
predicting no pneumothorax, so nothing is predicted.

:meth:`PostProcess.apply` is the one implementation of the rule. It decides at the resolution of
the map (where the search measured it) and shapes the mask at full size from the upsampled
probabilities. Submission, OOF re-scoring, the report and prediction on new images all call it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import ArrayLike

from pneumothorax.io.errors import PipelineError
from pneumothorax.io.paths import ExperimentDir

FULL = 1024
Rule = Literal["b_r", "triplet", "empty"]


class PostProcessError(PipelineError, ValueError):
    """A saved decision that cannot be read; the message names the file and key."""


@dataclass(frozen=True)
class PostProcess:
    """One post-processing rule with its thresholds."""

    rule: Rule = "b_r"
    b_th: float = 0.5
    r_th: float = 0.0
    gate: float = 0.0
    min_component: int = 0
    triplet: tuple[float, float, float] | None = None  # (top, area, bottom) when rule == "triplet"
    gate_blend: float = 0.0  # the weight of the map's peak probability in the gate score (0: the classifier's alone)
    gate_top: float = 0.0  # the peak is the mean p of this fraction of the map's highest pixels (0: the highest one)

    def __post_init__(self) -> None:
        if self.rule not in ("b_r", "triplet", "empty"):
            raise PostProcessError(f"rule {self.rule!r} is not b_r, triplet or empty")
        if not 0.0 <= self.gate_blend <= 1.0:
            raise PostProcessError(f"gate_blend {self.gate_blend!r} is not between 0 and 1")
        if not 0.0 <= self.gate_top < 1.0:
            raise PostProcessError(f"gate_top {self.gate_top!r} is not a fraction of the map (0 to below 1)")
        if (self.rule == "triplet") != (self.triplet is not None):
            raise PostProcessError("a triplet rule needs triplet = [top, area, bottom], and only it")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["triplet"] = list(self.triplet) if self.triplet is not None else None
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "post-processing") -> PostProcess:
        """Build from :meth:`to_dict`'s output; an unknown key names itself."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise PostProcessError(f"{source}: unknown key {unknown[0]!r}; keys: {sorted(names)}")
        triplet = values.get("triplet")
        return cls(**{**values, "triplet": tuple(triplet) if triplet is not None else None})

    def decide(self, probs: np.ndarray, gate_prob: float | None = None) -> np.ndarray:
        """The bool mask at the map's own resolution (uint8 maps mean p/255)."""
        values = probs.astype(np.float64) / 255.0 if probs.dtype == np.uint8 else probs
        h, w = values.shape
        scale = (FULL / h) * (FULL / w)
        empty = np.zeros((h, w), dtype=bool)
        if self.rule == "empty" or (
            gate_prob is not None
            and self.gate > 0
            and gate_score(gate_prob, peak(probs[None], self.gate_top)[0], self.gate_blend) < self.gate
        ):
            return empty
        if self.triplet is not None:
            top, area, bottom = self.triplet
            if (values > top).sum() * scale < area:
                return empty
            mask = values > bottom
        else:
            mask = values > self.b_th
        if self.min_component > 0 and mask.any():
            mask = remove_small(mask, self.min_component / scale)
        if mask.sum() * scale < self.r_th:
            return empty
        return mask

    def apply(
        self, probs: np.ndarray, gate_prob: float | None = None, shape: tuple[int, int] = (FULL, FULL)
    ) -> np.ndarray:
        """The full-size bool mask of one map: decided at the map's resolution, shaped at ``shape`` by
        thresholding the upsampled probabilities (components removed at low resolution stay removed)."""
        decision = self.decide(probs, gate_prob)
        if not decision.any():
            return np.zeros(shape, dtype=bool)
        if decision.shape == tuple(shape):
            return decision
        up = cv2.resize(probs, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        values = up.astype(np.float64) / 255.0 if up.dtype == np.uint8 else up
        full = values > (self.triplet[2] if self.triplet is not None else self.b_th)
        if self.min_component:
            keep = cv2.resize(decision.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
            full &= cv2.dilate(keep, np.ones((5, 5), np.uint8)) > 0
        return full

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.rule == "empty":
            return "predict nothing (no rule beat all-empty)"
        shape = f"triplet {self.triplet}" if self.triplet is not None else f"B-TH {self.b_th:g}, R-TH {self.r_th:g}"
        top = f" (mean of its top {self.gate_top:.2%})" if self.gate_top else ""
        blend = f" on {1 - self.gate_blend:g} classifier + {self.gate_blend:g} peak{top}" if self.gate_blend else ""
        return f"{shape}, gate {self.gate:g}{blend}, min component {self.min_component}"


def peak(probs: np.ndarray, top: float = 0.0) -> np.ndarray:
    """Each map's peak probability, as :meth:`PostProcess.decide` reads it: (N, H, W) -> (N,) float64. The
    highest pixel, or with ``top`` the mean of the highest ``top`` fraction of pixels (at least one)."""
    return peaks(probs, [top])[top]


def peaks(probs: np.ndarray, tops: Sequence[float]) -> dict[float, np.ndarray]:
    """:func:`peak` at each fraction of ``tops``: the highest pixel in one vectorised pass, wider fractions from one
    histogram per map (a memory-mapped fold is read a row at a time, not copied).

    A uint8 map's top-k sum comes exactly, in integers, from its 256-bin histogram; a float map's top pixels
    are summed in sorted order. Either way a map scores the same alone and in a batch, so the search's gate
    equals the one ``decide`` replays."""
    flat = np.asarray(probs).reshape(len(probs), -1)
    ks = {top: max(1, int(round(top * flat.shape[1]))) for top in tops}
    out = {}
    if any(k == 1 for k in ks.values()):  # no pass over the maps for a maximum that no fraction asks for
        highest = flat.max(axis=1).astype(np.float64)
        out = {top: highest / 255.0 if flat.dtype == np.uint8 else highest for top, k in ks.items() if k == 1}
    wider = {top: k for top, k in ks.items() if k > 1}
    for top in wider:
        out[top] = np.empty(len(flat), dtype=np.float64)
    for i, row in enumerate(flat if wider else ()):
        row = np.asarray(row)
        hist = np.bincount(row, minlength=256) if row.dtype == np.uint8 else None
        for top, k in wider.items():
            out[top][i] = _top_mean(row, hist, k)
    return out


def _top_mean(row: np.ndarray, hist: np.ndarray | None, k: int) -> float:
    """The mean of ``row``'s ``k`` highest values, in [0, 1] (uint8 rows: value / 255, from ``hist``)."""
    if hist is None:
        return float(np.sort(np.partition(row, row.size - k)[-k:]).astype(np.float64).sum() / k)
    counts = hist[::-1]  # from value 255 down
    before = np.cumsum(counts) - counts
    taken = np.clip(k - before, 0, counts)
    return float((taken * np.arange(255, -1, -1)).sum()) / k / 255.0


def gate_score(gate_prob: ArrayLike, peak_prob: ArrayLike, blend: float) -> np.ndarray:
    """What the gate threshold compares: ``(1 - blend) * classifier probability + blend * the map's peak``.
    The search and :meth:`PostProcess.decide` both call it, so their float sums are the same."""
    if blend == 0.0:
        return np.asarray(gate_prob, dtype=np.float64)
    return (1.0 - blend) * np.asarray(gate_prob, dtype=np.float64) + blend * np.asarray(peak_prob, dtype=np.float64)


def remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_pixels`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def adopt_old_name(exp: ExperimentDir) -> Path:
    """``exp``'s decision file: an experiment searched before the file was renamed keeps its ``thresholds.json``,
    which is renamed ``postprocess.json`` here, once, with a message. Returns ``exp.postprocess``."""
    if not exp.postprocess.exists() and exp.old_postprocess.exists():
        os.replace(exp.old_postprocess, exp.postprocess)
        print(f"{exp.old_postprocess}: renamed {exp.postprocess.name} (its name since 2026-12)", file=sys.stderr)
    return exp.postprocess


def load(path: Path) -> tuple[PostProcess, dict[str, Any]]:
    """``postprocess.json`` -> the decision and the scores saved beside it.

    Raises:
        PostProcessError: naming the file when it holds no decision (an old format: rerun ``make search``).
    """
    saved = json.loads(Path(path).read_text())
    if "postprocess" not in saved:
        raise PostProcessError(f"{path}: no 'postprocess' decision (written by an older version); rerun `make search`")
    return PostProcess.from_dict(saved["postprocess"], str(path)), {
        k: v for k, v in saved.items() if k != "postprocess"
    }
