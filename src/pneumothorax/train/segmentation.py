"""The segmentation task: a U-Net (or FPN, ...) per fold, stages at rising resolution, SWA.

:func:`train_fold` trains fold ``k`` of an experiment with the one :class:`~pneumothorax.train.trainer.Trainer`
into ``models/<exp>/fold<k>/`` (see :class:`~pneumothorax.io.paths.RunDir`); ``model.pt`` holds the
weights ``segmentation.oof_weights`` chooses, with which ``make oof`` predicts the fold's held-out images
(:mod:`pneumothorax.predict.oof`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumothorax.data import augmentations, datasets
from pneumothorax.io import config as config_mod
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir, RunDir
from pneumothorax.models import devices, factory, losses, trained
from pneumothorax.models.devices import Runtime
from pneumothorax.train.trainer import Averaging, FoldJob, Precision, fit_fold


def dice_iou_on_device(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image competition Dice and IoU of ``logits > 0`` against ``masks > 0.5``, on the tensors' device
    (both empty = 1, as :mod:`pneumothorax.io.metric`)."""
    pred, truth = (logits > 0).flatten(1), (masks > 0.5).flatten(1)
    inter = (pred & truth).sum(1).double()
    total = pred.sum(1).double() + truth.sum(1).double()
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return dice, dice / (2 - dice)


class SegmentationTask:
    """Fold ``fold`` of the segmenter: its images, model, loss, validation and out-of-fold maps."""

    curves = [("train_loss", "train loss"), ("val_loss", "val loss"), ("val_dice", "val Dice"), ("val_iou", "val IoU")]
    log_keys = ("val_dice", "val_iou")

    def __init__(self, cfg: Config, fold: int, processed: ProcessedDir, exp: ExperimentDir) -> None:
        seg = cfg.segmentation
        for stage in seg.stages:
            if stage.size not in cfg.data.sizes:
                raise config_mod.ConfigError(
                    f"segmentation stage size {stage.size} is not in data.sizes {cfg.data.sizes}"
                )
        self.cfg, self.fold, self.processed, self.exp = cfg, fold, processed, exp
        self.train_df, self.valid_df = datasets.fold_rows(processed.root, exp.folds, fold, cfg.data.use_extra)
        if not len(self.valid_df):
            raise ValueError(f"fold {fold} has no image in {exp.folds}")
        self.label = f"segmentation fold {fold}"
        self.stages = seg.stages
        self.select_from = len(self.stages) - 1  # best.pt: the final stage's best epoch
        self.precision = Precision(seg.amp, seg.channels_last, seg.grad_clip, seg.sync_bn, seg.cpu_bf16)
        self.averaging = Averaging(seg.top_k, seg.ema_decay)
        self.loss_fn = losses.ComboLoss(seg.loss)
        self.valid_loaders: dict[int, Any] = {}

    def build_model(self, log: Any) -> nn.Module:
        seg = self.cfg.segmentation
        model = factory.create_segmenter(seg, self.cfg.data.channels)
        if seg.encoder_init != "none":
            source = encoder_init_source(seg.encoder_init, self.exp, self.fold)
            report = factory.init_encoder_from_classifier(model, factory.load_state_dict_file(source))
            log.info(
                "encoder initialised from %s: all %d encoder tensors loaded, %d classifier tensors unused",
                source,
                len(report["loaded"]),
                len(report["unused"]),
            )
        return model

    def loaders(self, p: int, runtime: Runtime) -> tuple[Any, Any]:
        stage, cfg = self.cfg.segmentation.stages[p], self.cfg
        train_ds = datasets.CacheDataset(
            self.processed.root,
            self.train_df["split"].to_numpy(),
            stage.size,
            self.train_df["index"].to_numpy(),
            augmentations.segmentation_augment(stage.augment, stage.size, stage.augment_p),
            clahe=cfg.data.clahe,
        )
        sampler = datasets.PositiveRateSampler(
            self.train_df["has_pneumothorax"].to_numpy(),
            stage.positive_rate,
            stage.positive_rate_end,
            stage.epochs,
            cfg.seed + 1000 * self.fold + p,
            runtime.rank,
            runtime.world_size,
            stage.epoch_images,
        )
        batch = devices.rank_batch(stage.batch_size, runtime, f"segmentation.stages[{p}].batch_size")
        loader = datasets.make_loader(
            train_ds, batch, sampler, cfg.data.workers, drop_last=len(sampler) > batch, seed=cfg.seed + p
        )
        return loader, sampler

    def _valid_loader(self, p: int, runtime: Runtime) -> Any:
        if p not in self.valid_loaders:
            stage = self.cfg.segmentation.stages[p]
            shard = self.valid_df["index"].to_numpy()[runtime.rank :: runtime.world_size]  # this rank's images
            dataset = datasets.CacheDataset(self.processed.root, "train", stage.size, shard, clahe=self.cfg.data.clahe)
            batch = devices.rank_batch(stage.batch_size, runtime, f"segmentation.stages[{p}].batch_size")
            self.valid_loaders = {p: datasets.make_loader(dataset, batch, workers=self.cfg.data.workers)}
        return self.valid_loaders[p]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, targets)

    @torch.no_grad()
    def validate(self, model: nn.Module, p: int, runtime: Runtime) -> dict[str, float]:
        """Loss, competition Dice (p > 0.5) and IoU, each rank over its shard, all-reduced once: every
        rank returns the scores of the whole validation set (the loss is a mean over batches)."""
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss * n, Dice, IoU, n
        for images, masks in self._valid_loader(p, runtime):
            x = datasets.model_input(images, self.cfg.data.channels, runtime.device, self.precision.channels_last)
            y = datasets.model_target(masks, runtime.device)
            with devices.autocast(runtime.device, self.precision.amp):
                logits = model(x).float()
            dice, iou = dice_iou_on_device(logits, y)
            sums += torch.stack(
                [self.loss_fn(logits, y).double() * len(x), dice.sum(), iou.sum(), dice.new_tensor(len(x))]
            )
        loss, dice, iou, n = devices.sum_over_ranks(sums, runtime).tolist()
        nan = float("nan")
        return {
            "val_loss": loss / n if n else nan,
            "val_dice": dice / n if n else nan,
            "val_iou": iou / n if n else nan,
        }

    def monitor(self, scores: dict[str, float]) -> float:
        return scores["val_dice"]

    def bn_loader(self, p: int, runtime: Runtime) -> Any:
        """This rank's share of a seeded subset of ``segmentation.swa_bn_images`` training images (all when 0).

        Every rank gets as many images (the subset is cut to a multiple of the ranks): under SyncBatchNorm each
        forward is a collective, and a rank with one batch more would wait forever for the others."""
        stage, limit = self.cfg.segmentation.stages[p], self.cfg.segmentation.swa_bn_images
        chosen = np.arange(len(self.train_df))
        if limit and len(chosen) > limit:
            chosen = np.sort(np.random.default_rng(self.cfg.seed + p).choice(chosen, size=limit, replace=False))
        chosen = chosen[: len(chosen) - len(chosen) % runtime.world_size][runtime.rank :: runtime.world_size]
        rows = self.train_df.iloc[chosen]
        dataset = datasets.CacheDataset(
            self.processed.root,
            rows["split"].to_numpy(),
            stage.size,
            rows["index"].to_numpy(),
            clahe=self.cfg.data.clahe,
        )
        batch = devices.rank_batch(stage.batch_size, runtime, f"segmentation.stages[{p}].batch_size")
        return datasets.make_loader(dataset, batch, workers=self.cfg.data.workers)

    def finish(self, run: RunDir, runtime: Runtime, progress: bool) -> tuple[dict[str, Any], str]:
        """The weights ``segmentation.oof_weights`` names go into ``model.pt`` (``make oof`` predicts the
        held-out images with them, as ``make infer`` the test set)."""
        return {"fold": self.fold}, trained.segmenter_weights(run, self.cfg.segmentation.oof_weights).stem


def train_fold(cfg: Config, fold: int, processed: Any, exp: Any, **options: Any) -> dict[str, Any]:
    """Train segmentation fold ``fold`` of experiment folder ``exp`` on its ``folds.csv``; resume a killed
    run; retrain a run made under other settings (see :mod:`pneumothorax.train.trainer`). Returns the summary.

    ``options``: ``device``, ``progress``, ``max_epochs`` (stop after that many epochs: tests of resuming).
    """
    job = FoldJob.of(cfg, fold, processed, exp)
    task = SegmentationTask(cfg, fold, job.processed, job.exp)
    return fit_fold(job, "segmentation", task, job.exp.segmenter(fold), cfg.seed + fold, **options)


def encoder_init_source(value: str, exp: ExperimentDir, fold: int) -> Path:
    """``classifier`` (this experiment's classifier fold), ``pretrain`` (its external pre-training) or a path."""
    if value == "classifier":
        return exp.classifier(fold).model
    if value == "pretrain":
        return exp.pretrain.model
    return Path(value)
