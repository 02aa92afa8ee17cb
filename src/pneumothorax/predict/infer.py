"""``make infer``: test-set probabilities of every fold (ensembled, flip TTA) and the gate's probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pneumothorax.data import datasets
from pneumothorax.io import atomic
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.models import devices, trained, tta


def test_rows(processed: ProcessedDir) -> pd.DataFrame:
    """The prepared test images in cache order, with their decode errors ("" when fine)."""
    meta = pd.read_csv(processed.metadata, dtype={"image_id": str}, keep_default_na=False)
    return meta[meta["split"] == "test"].sort_values("index").reset_index(drop=True)


def infer_test(
    cfg: Config, exp: ExperimentDir, processed: ProcessedDir, device: str | None = None, progress: bool = True
) -> Path:
    """Test-set probabilities for every trained fold (ensembled), plus gate probabilities.

    Writes ``test/probs.npy`` (N, S, S) uint8 p*255 at the final stage's size, ``gate.csv``
    (image_id, prob; 1.0 where the gate is off) and, last, ``ids.csv`` (image_id, row in probs
    or -1 for an image that failed to decode, error). Returns the folder.
    """
    runtime = devices.setup_runtime(device)
    devices.fast_kernels(runtime.device, cfg.deterministic)
    test = test_rows(processed)
    good = test[test["error"] == ""]
    folds = range(cfg.data.n_folds)
    if len(good):
        fold_models = [trained.load_segmenter(cfg, exp.segmenter(k), cfg.infer.weights, runtime.device) for k in folds]
        # test images have no masks: the "label" target with no labels yields zeros
        dataset = datasets.CacheDataset(
            processed.root, "test", cfg.final_size, good["index"].to_numpy(), target="label", clahe=cfg.data.clahe
        )
        seg = cfg.segmentation
        tta.predict_to_file(
            fold_models,
            dataset,
            exp.test_maps,
            cfg.infer.tta,
            runtime.device,
            cfg.data.channels,
            cfg.infer.batch_size,
            seg.amp,
            seg.channels_last,
            cfg.data.workers,
            progress=progress,
            desc="test segmentation",
        )
    else:
        atomic.save_npy(exp.test_maps, np.zeros((0, cfg.final_size, cfg.final_size), np.uint8))
    gate = np.ones(len(good))
    if cfg.classifier.enabled and len(good):
        gate = _gate(cfg, exp, processed, good, runtime.device, progress)
    ids = test[["image_id", "error"]].copy()
    row = np.full(len(test), -1, dtype=np.int64)
    row[test["error"].to_numpy() == ""] = np.arange(len(good))
    ids.insert(1, "row", row)
    atomic.write_csv(exp.test_gate, pd.DataFrame({"image_id": good["image_id"].to_numpy(), "prob": gate}))
    atomic.write_csv(exp.test_ids, ids)
    return exp.test


def _gate(
    cfg: Config, exp: ExperimentDir, processed: ProcessedDir, good: pd.DataFrame, device: torch.device, progress: bool
) -> np.ndarray:
    """Mean gate probability of the classifier folds (with the TTA of ``infer.tta``)."""
    models = [trained.load_classifier(cfg, exp.classifier(k), device) for k in range(cfg.data.n_folds)]
    dataset = datasets.CacheDataset(
        processed.root, "test", cfg.classifier.size, good["index"].to_numpy(), target="label", clahe=cfg.data.clahe
    )
    return tta.predict_labels(
        models,
        dataset,
        cfg.infer.tta,
        device,
        cfg.data.channels,
        cfg.infer.batch_size,
        cfg.classifier.amp,
        progress=progress,
        desc="test gate",
        channels_last=cfg.classifier.channels_last,
        workers=cfg.data.workers,
    )
