"""The classifier task: the image-level gate in front of the segmenter (timm, Xception by default).

:func:`train_classifier_fold` trains fold ``k`` with the one :class:`~pneumothorax.train.trainer.Trainer`
into ``models/<exp>/classifier/fold<k>/``: ``best.pt`` by validation AUC (``model.pt``), and at the end
``metrics.json`` (AUC, MCC, precision, recall, accuracy at ``classifier.threshold`` on the validation
images). ``make oof`` gives the search its gate probabilities (:mod:`pneumothorax.predict.oof`).

:func:`pretrain_external` trains the same classifier on an external weakly-labelled set (a CSV
of image paths and labels, e.g. ChestX-ray14 or CheXpert downloads) into
``models/<exp>/pretrain/``; a segmentation config then initialises its encoder from it with
``segmentation.encoder_init: pretrain``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pneumothorax.data import augmentations, datasets
from pneumothorax.io import config as config_mod
from pneumothorax.io import metric
from pneumothorax.io.config import Config, StageConfig
from pneumothorax.io.paths import RunDir
from pneumothorax.models import devices, factory, trained, tta
from pneumothorax.models.devices import Runtime
from pneumothorax.train.trainer import Averaging, FoldJob, Precision, Trainer, fit_fold, settings_for


@dataclass(frozen=True)
class Images:
    """What a classifier run learns from: training and validation datasets with their labels."""

    train: Any
    train_labels: np.ndarray
    valid: Any
    valid_labels: np.ndarray
    valid_ids: np.ndarray


class ClassifierTask:
    """The gate (or its external pre-training): model, BCE loss, AUC validation, out-of-fold probabilities."""

    curves = [("train_loss", "train loss"), ("val_loss", "val loss"), ("val_auc", "val AUC")]
    log_keys = ("val_auc", "val_mcc")
    select_from = 0

    def __init__(self, cfg: Config, label: str, images: Images, sampler_seed: int) -> None:
        c = cfg.classifier
        self.cfg, self.label, self.images, self.sampler_seed = cfg, label, images, sampler_seed
        self.stages = (
            StageConfig(
                size=c.size,
                epochs=c.epochs,
                batch_size=c.batch_size,
                lr=c.lr,
                min_lr=c.min_lr,
                weight_decay=c.weight_decay,
                accumulate=c.accumulate,
            ),
        )
        self.precision = Precision(c.amp, c.channels_last, cpu_bf16=c.cpu_bf16)
        self.averaging = Averaging(c.top_k, c.ema_decay)

    def build_model(self, log: Any) -> nn.Module:
        return factory.create_classifier(self.cfg.classifier, self.cfg.data.channels)

    def loaders(self, p: int, runtime: Runtime) -> tuple[Any, Any]:
        c = self.cfg.classifier
        sampler = datasets.PositiveRateSampler(
            self.images.train_labels,
            c.positive_rate,
            None,
            c.epochs,
            self.sampler_seed,
            runtime.rank,
            runtime.world_size,
            c.epoch_images,
        )
        batch = devices.rank_batch(c.batch_size, runtime, "classifier.batch_size")
        loader = datasets.make_loader(
            self.images.train, batch, sampler, self.cfg.data.workers, drop_last=len(sampler) > batch, seed=self.cfg.seed
        )
        return loader, sampler

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets)

    def predict(self, model: nn.Module, dataset: Any, device: Any, views: tuple[str, ...] = ()) -> np.ndarray:
        """Probabilities of every image of ``dataset`` on this process (no collective)."""
        c = self.cfg.classifier
        channels = self.cfg.data.channels
        return tta.predict_labels(
            [model], dataset, views, device, channels, c.batch_size, c.amp, False, channels_last=c.channels_last
        )

    def validate(self, model: nn.Module, p: int, runtime: Runtime) -> dict[str, float]:
        """AUC, MCC, precision, recall, accuracy and loss: each rank predicts its share, gathered on every rank."""
        valid = self.images.valid
        shard = torch.utils.data.Subset(valid, range(runtime.rank, len(valid), runtime.world_size))
        probs = devices.gather_shards(self.predict(model, shard, runtime.device), len(valid), runtime)
        labels = self.images.valid_labels
        scores = {f"val_{k}": v for k, v in metric.gate_metrics(labels, probs, self.cfg.classifier.threshold).items()}
        scores.pop("val_threshold")
        clipped = torch.tensor(probs, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
        scores["val_loss"] = float(F.binary_cross_entropy(clipped, torch.tensor(labels, dtype=torch.float64)))
        return scores

    def monitor(self, scores: dict[str, float]) -> float:
        """AUC; the loss where AUC is undefined (one class only)."""
        return scores["val_auc"] if not np.isnan(scores["val_auc"]) else -scores["val_loss"]

    def bn_loader(self, p: int, runtime: Runtime) -> Any:
        raise NotImplementedError("the classifier's stage has no SWA")

    def finish(self, run: RunDir, runtime: Runtime, progress: bool) -> tuple[dict[str, Any], str]:
        """The gate's metrics of the weights ``classifier.weights`` names on the validation images (rank 0
        alone: no collective); they become ``model.pt``, and ``make oof`` predicts the validation images
        again with ``infer.tta`` for the search."""
        which = self.cfg.classifier.weights
        model = trained.load_classifier(self.cfg, run, runtime.device, which)
        probs = self.predict(model, self.images.valid, runtime.device)
        return metric.gate_metrics(self.images.valid_labels, probs, self.cfg.classifier.threshold), which


def train_classifier_fold(cfg: Config, fold: int, processed: Any, exp: Any, **options: Any) -> dict[str, Any]:
    """Train classifier fold ``fold`` of experiment folder ``exp`` (resuming; retraining a run made under
    other settings); return its OOF metrics. ``options``: ``device``, ``progress``, ``max_epochs``."""
    job = FoldJob.of(cfg, fold, processed, exp)
    c = cfg.classifier
    if c.size not in cfg.data.sizes:
        raise config_mod.ConfigError(f"classifier.size {c.size} is not in data.sizes {cfg.data.sizes}")
    train_df, valid_df = datasets.fold_rows(job.processed.root, job.exp.folds, fold, cfg.data.use_extra)
    augment = augmentations.classifier_augment(c.size, c.augment_p)
    images = Images(
        _labelled(job.processed.root, c.size, train_df, cfg.data.clahe, augment),
        train_df["has_pneumothorax"].to_numpy(),
        _labelled(job.processed.root, c.size, valid_df, cfg.data.clahe),
        valid_df["has_pneumothorax"].to_numpy(),
        valid_df["image_id"].to_numpy(),
    )
    task = ClassifierTask(cfg, f"classifier fold {fold}", images, cfg.seed + 100 + fold)
    return fit_fold(job, "classifier", task, job.exp.classifier(fold), cfg.seed + 100 + fold, **options)


def _labelled(
    processed: Path, size: int, rows: pd.DataFrame, clahe: float, augment: Any = None
) -> datasets.CacheDataset:
    labels = rows["has_pneumothorax"].to_numpy()
    return datasets.CacheDataset(
        processed, rows["split"].to_numpy(), size, rows["index"].to_numpy(), augment, "label", labels, clahe
    )


def read_external_csv(path: str | Path) -> pd.DataFrame:
    """An external label list: columns ``path`` and ``label`` (0/1); relative paths are beside the CSV.

    Raises:
        ValueError: naming the file and the first bad row (missing column, label not 0/1,
            missing image).
    """
    path = Path(path)
    table = pd.read_csv(path, skipinitialspace=True)
    table.columns = [str(col).strip() for col in table.columns]
    if not {"path", "label"} <= set(table.columns):
        raise ValueError(f"{path}: expected columns path,label, got {list(table.columns)}")
    bad = ~table["label"].isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: line {i + 2}: label {table['label'].iloc[i]} is not 0 or 1")
    table["path"] = [str(p) if Path(p).is_absolute() else str(path.parent / p) for p in table["path"].astype(str)]
    missing = [i for i, p in enumerate(table["path"]) if not Path(p).exists()]
    if missing:
        raise ValueError(f"{path}: line {missing[0] + 2}: image {table['path'].iloc[missing[0]]} not found")
    return table


def pretrain_external(
    cfg: Config,
    csv_path: str | Path,
    out_dir: str | Path,
    holdout: float = 0.1,
    device: str | None = None,
    progress: bool = True,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Train the configured classifier on an external CSV of image paths and 0/1 labels.

    Images (PNG/JPEG/DICOM) are read and resized to ``classifier.size``; a seeded
    ``holdout`` share validates. Writes the same files as a fold into ``out_dir``.
    """
    c = cfg.classifier
    table = read_external_csv(csv_path)
    valid = np.random.default_rng(cfg.seed).random(len(table)) < holdout
    if valid.all() or not valid.any():
        valid = np.arange(len(table)) % 10 == 0
    train_df, valid_df = table[~valid], table[valid]
    augment = augmentations.classifier_augment(c.size, c.augment_p)
    images = Images(
        datasets.ImageListDataset(
            train_df["path"].tolist(), train_df["label"].to_numpy(), c.size, augment, cfg.data.clahe
        ),
        train_df["label"].to_numpy(),
        datasets.ImageListDataset(
            valid_df["path"].tolist(), valid_df["label"].to_numpy(), c.size, clahe=cfg.data.clahe
        ),
        valid_df["label"].to_numpy(),
        valid_df["path"].to_numpy(),
    )
    task = ClassifierTask(cfg, "classifier pretrain", images, cfg.seed + 1099)
    split = hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()[:16]  # the external set is the split
    settings = settings_for(cfg, "classifier", cfg.seed + 1099, split, models_dir=Path(out_dir).resolve().parents[1])
    with devices.running(device) as runtime:
        devices.check_batches(cfg, runtime.world_size)
        return Trainer(task, RunDir(Path(out_dir)), settings, runtime, progress, max_epochs).fit()
