"""A trained fold loaded for inference: the segmenter's weights of a name, the gate's.

Apart from the training tasks (:mod:`pneumothorax.train`) so that the processes that only predict (``make oof``,
``make infer``, ``make predict``) load no augmentation library (albumentations: about 0.6 s of a start).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pneumothorax.io.config import Config
from pneumothorax.io.errors import MissingFileError
from pneumothorax.io.paths import RunDir
from pneumothorax.models import devices, factory


def segmenter_weights(run: RunDir, which: str) -> Path:
    """``best``/``last``/``swa``/``topk``/``ema``/``model`` weights of a fold; ``swa`` falls back to ``last``
    when the final stage had no SWA."""
    path = run.weights(which)
    if which == "swa" and not path.exists():
        path = run.weights("last")
    if not path.exists():
        hint = {"topk": " (segmentation.top_k is 0?)", "ema": " (segmentation.ema_decay is 0?)"}.get(which, "")
        raise MissingFileError(f"{path}: no {which} weights{hint}; is the fold trained?")
    return path


def load_segmenter(cfg: Config, run: RunDir, which: str, device: torch.device) -> nn.Module:
    """Build a fold's segmenter (no download) and load its ``which`` weights, ready for inference."""
    seg = cfg.segmentation
    model = factory.create_segmenter(replace(seg, encoder_weights="none"), cfg.data.channels)
    model.load_state_dict(factory.load_state_dict_file(segmenter_weights(run, which)))
    return devices.in_memory_format(model.to(device).eval(), seg.channels_last)


def load_classifier(cfg: Config, run: RunDir, device: torch.device, which: str = "model") -> nn.Module:
    """Build the classifier (no download) and load a run's weights."""
    model = factory.create_classifier(replace(cfg.classifier, pretrained="none"), cfg.data.channels)
    model.load_state_dict(factory.load_state_dict_file(run.weights(which)))
    return devices.in_memory_format(model.to(device).eval(), cfg.classifier.channels_last)
