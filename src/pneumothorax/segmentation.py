"""The segmentation task: a U-Net (or FPN, ...) per fold, stages at rising resolution, SWA, OOF maps.

:func:`train_fold` trains fold ``k`` of an experiment with the one :class:`~pneumothorax.trainer.Trainer`
into ``models/<exp>/fold<k>/`` (see :class:`~pneumothorax.paths.RunDir`); at the end the fold
predicts its held-out images (hflip TTA) with the weights ``segmentation.oof_weights`` chooses:
``oof.npy`` (uint8 p*255 at the final stage's size) and ``oof_ids.csv``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import config as config_mod
from . import data, devices, files, losses, metric, models, prepare, tta
from .config import Config
from .devices import Runtime
from .paths import ExperimentDir, ProcessedDir, RunDir
from .trainer import Averaging, FoldJob, Phase, Precision, fit_fold


def dice_iou_on_device(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image competition Dice and IoU of ``logits > 0`` against ``masks > 0.5``, on the tensors' device
    (both empty = 1, as :mod:`pneumothorax.metric`)."""
    pred, truth = (logits > 0).flatten(1), (masks > 0.5).flatten(1)
    inter = (pred & truth).sum(1).double()
    total = pred.sum(1).double() + truth.sum(1).double()
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return dice, dice / (2 - dice)


def phases(cfg: Config) -> tuple[Phase, ...]:
    """The segmentation stages as trainer phases."""
    keys = ("epochs", "lr", "batch_size", "size", "min_lr", "weight_decay", "scheduler", "plateau_factor")
    keys += ("plateau_patience", "swa_epochs", "swa_lr", "accumulate")
    return tuple(Phase(**{key: getattr(stage, key) for key in keys}) for stage in cfg.segmentation.stages)


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
        rows = data.train_rows(processed.root, exp.folds)
        if fold not in set(rows["fold"]):
            raise ValueError(f"fold {fold} not in {exp.folds} (folds {sorted(set(rows['fold']))})")
        self.train_df, self.valid_df = rows[rows["fold"] != fold], rows[rows["fold"] == fold]
        self.label = f"segmentation fold {fold}"
        self.phases = phases(cfg)
        self.select_from = len(self.phases) - 1  # best.pt: the final stage's best epoch
        self.precision = Precision(seg.amp, seg.channels_last, seg.grad_clip, seg.sync_bn)
        self.averaging = Averaging(seg.top_k, seg.ema_decay)
        self.loss_fn = losses.ComboLoss(seg.loss)
        self.valid_loaders: dict[int, Any] = {}

    def build_model(self, log: Any) -> nn.Module:
        seg = self.cfg.segmentation
        model = models.create_segmenter(seg, self.cfg.data.channels)
        if seg.encoder_init != "none":
            source = encoder_init_source(seg.encoder_init, self.exp, self.fold)
            report = models.init_encoder_from_classifier(model, models.load_state_dict_file(source))
            log.info(
                "encoder initialised from %s: all %d encoder tensors loaded, %d classifier tensors unused",
                source,
                len(report["loaded"]),
                len(report["unused"]),
            )
        return model

    def loaders(self, p: int, runtime: Runtime) -> tuple[Any, Any]:
        stage, cfg = self.cfg.segmentation.stages[p], self.cfg
        train_ds = data.CacheDataset(
            self.processed.root,
            "train",
            stage.size,
            self.train_df["index"].to_numpy(),
            data.segmentation_augment(stage.augment, stage.size, stage.augment_p),
        )
        sampler = data.PositiveRateSampler(
            self.train_df["has_pneumothorax"].to_numpy(),
            stage.positive_rate,
            stage.positive_rate_end,
            stage.epochs,
            cfg.seed + 1000 * self.fold + p,
            runtime.rank,
            runtime.world_size,
        )
        batch = devices.rank_batch(stage.batch_size, runtime, f"segmentation.stages[{p}].batch_size")
        loader = data.make_loader(
            train_ds, batch, sampler, cfg.data.workers, drop_last=len(sampler) > batch, seed=cfg.seed + p
        )
        return loader, sampler

    def _valid_loader(self, p: int, runtime: Runtime) -> Any:
        if p not in self.valid_loaders:
            stage = self.cfg.segmentation.stages[p]
            shard = self.valid_df["index"].to_numpy()[runtime.rank :: runtime.world_size]  # this rank's images
            dataset = data.CacheDataset(self.processed.root, "train", stage.size, shard)
            batch = devices.rank_batch(stage.batch_size, runtime, f"segmentation.stages[{p}].batch_size")
            self.valid_loaders = {p: data.make_loader(dataset, batch, workers=self.cfg.data.workers)}
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
            x = data.model_input(images, self.cfg.data.channels, runtime.device, self.precision.channels_last)
            y = data.model_target(masks, runtime.device)
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
        """This rank's share of a seeded subset of ``segmentation.swa_bn_images`` training images (all when 0)."""
        stage, limit = self.cfg.segmentation.stages[p], self.cfg.segmentation.swa_bn_images
        rows = self.train_df["index"].to_numpy()
        if limit and len(rows) > limit:
            rows = np.sort(np.random.default_rng(self.cfg.seed + p).choice(rows, size=limit, replace=False))
        dataset = data.CacheDataset(self.processed.root, "train", stage.size, rows[runtime.rank :: runtime.world_size])
        batch = devices.rank_batch(stage.batch_size, runtime, f"segmentation.stages[{p}].batch_size")
        return data.make_loader(dataset, batch, workers=self.cfg.data.workers)

    def finish(self, run: RunDir, runtime: Runtime, progress: bool) -> tuple[dict[str, Any], str]:
        """OOF maps of the held-out images with the chosen weights, and their Dice at p > 0.5."""
        seg, final = self.cfg.segmentation, self.cfg.segmentation.stages[-1]
        weights = weights_path(run, seg.oof_weights).stem
        model = load_model(self.cfg, run, weights, runtime.device)
        dataset = data.CacheDataset(self.processed.root, "train", final.size, self.valid_df["index"].to_numpy())
        tta.predict_to_file(
            [model],
            dataset,
            run.oof_maps,
            ("hflip",),
            runtime.device,
            self.cfg.data.channels,
            final.batch_size,
            seg.amp,
            seg.channels_last,
            progress=progress,
            desc=f"oof fold {self.fold}",
        )
        files.write_csv(run.oof_ids, self.valid_df[["image_id", "index", "has_pneumothorax"]])
        masks = prepare.load_cache(self.processed.root, "masks", "train", final.size)
        oof_dice, empty = oof_scores(run.oof_maps, masks, self.valid_df)
        return {"fold": self.fold, "oof_dice_at_0.5": oof_dice, "all_empty_dice": empty}, weights


def train_fold(cfg: Config, fold: int, processed: Any, exp: Any, **options: Any) -> dict[str, Any]:
    """Train segmentation fold ``fold`` of experiment folder ``exp`` on its ``folds.csv``; resume a killed
    run; retrain a run made under other settings (see :mod:`pneumothorax.trainer`). Returns the summary.

    ``options``: ``device``, ``progress``, ``max_epochs`` (stop after that many epochs: tests of resuming).
    """
    job = FoldJob.of(cfg, fold, processed, exp)
    task = SegmentationTask(cfg, fold, job.processed, job.exp)
    return fit_fold(job, "segmentation", task, job.exp.segmenter(fold), cfg.seed + fold, **options)


def oof_scores(oof_path: Path, masks: np.ndarray, valid_df: pd.DataFrame, chunk: int = 64) -> tuple[float, float]:
    """Mean Dice at p > 0.5 and the all-empty score of a fold's OOF maps, read in chunks (a 1024 fold
    does not fit in memory twice)."""
    probs = np.load(oof_path, mmap_mode="r")
    rows = valid_df["index"].to_numpy()
    dice, empty = [], []
    for start in range(0, len(rows), chunk):
        truth = masks[rows[start : start + chunk]] > 0
        dice.append(metric.dice_per_image(np.asarray(probs[start : start + chunk]) > 127, truth))
        empty.append(~truth.reshape(len(truth), -1).any(axis=1))
    return float(np.concatenate(dice).mean()), float(np.concatenate(empty).mean())


def encoder_init_source(value: str, exp: ExperimentDir, fold: int) -> Path:
    """``classifier`` (this experiment's classifier fold), ``pretrain`` (its external pre-training) or a path."""
    if value == "classifier":
        return exp.classifier(fold).model
    if value == "pretrain":
        return exp.pretrain.model
    return Path(value)


def weights_path(run: RunDir, which: str) -> Path:
    """``best``/``last``/``swa``/``topk``/``ema``/``model`` weights of a fold; ``swa`` falls back to ``last``
    when the final stage had no SWA."""
    path = run.weights(which)
    if which == "swa" and not path.exists():
        path = run.weights("last")
    if not path.exists():
        hint = {"topk": " (segmentation.top_k is 0?)", "ema": " (segmentation.ema_decay is 0?)"}.get(which, "")
        raise FileNotFoundError(f"{path}: no {which} weights{hint}; is the fold trained?")
    return path


def load_model(cfg: Config, run: RunDir, which: str, device: torch.device) -> nn.Module:
    """Build a fold's segmenter (no download) and load its ``which`` weights, ready for inference."""
    seg = cfg.segmentation
    model = models.create_segmenter(replace(seg, encoder_weights="none"), cfg.data.channels)
    model.load_state_dict(models.load_state_dict_file(weights_path(run, which)))
    model.to(device).eval()
    if seg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
