"""Per-fold segmentation training: stages at rising resolution, SWA, resume, DDP, OOF predictions.

Outputs under ``out_dir`` (``models/<exp>/fold<k>/``): ``config.yaml`` (resolved), ``state.pt``
(resume point, rewritten after every epoch), ``last.pt``, ``best.pt``, ``swa.pt`` (weights of
the final stage), ``metrics.csv``, ``train.log``, ``curves.png``, ``oof.npy`` (uint8 p*255 of
the fold's held-out images at the final stage's size, hflip TTA) with ``oof_ids.csv``, and
``model.pt`` — the weights chosen by ``segmentation.oof_weights`` — written last: it marks the
fold as done.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import config as config_mod
from . import data, engine, files, infer, losses, metric, models, prepare
from .config import Config, StageConfig


class Interrupted(RuntimeError):
    """Raised by ``max_epochs`` to simulate a killed run (tests)."""


def dice_iou_on_device(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image competition Dice and IoU of ``logits > 0`` against ``masks > 0.5``, on the tensors' device
    (both empty = 1, as :mod:`pneumothorax.metric`)."""
    pred, truth = (logits > 0).flatten(1), (masks > 0.5).flatten(1)
    inter = (pred & truth).sum(1).double()
    total = pred.sum(1).double() + truth.sum(1).double()
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return dice, dice / (2 - dice)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: Any,
    runtime: engine.Runtime,
    amp: str,
    channels: int,
    channels_last: bool,
) -> dict[str, float]:
    """Validation loss, competition Dice (p > 0.5) and IoU, each rank over its shard of the images.

    Sums stay on the device and are all-reduced once: every rank returns the scores of the
    whole validation set (the loss is a mean over batches, so it depends a little on how the
    images are sharded).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss * n, Dice, IoU, n
    for images, masks in loader:
        x, y = (
            data.model_input(images, channels, runtime.device, channels_last),
            data.model_target(masks, runtime.device),
        )
        with engine.autocast(runtime.device, amp):
            logits = model(x).float()
        dice, iou = dice_iou_on_device(logits, y)
        sums += torch.stack([loss_fn(logits, y).double() * len(x), dice.sum(), iou.sum(), dice.new_tensor(len(x))])
    loss, dice, iou, n = engine.sum_over_ranks(sums, runtime).tolist()
    nan = float("nan")
    return {"val_loss": loss / n if n else nan, "val_dice": dice / n if n else nan, "val_iou": iou / n if n else nan}


def _plan(stages: tuple[StageConfig, ...]) -> list[tuple[int, int]]:
    return [(s, e) for s, stage in enumerate(stages) for e in range(stage.epochs)]


def train_fold(
    cfg: Config,
    fold: int,
    processed: str | Path,
    out_dir: str | Path,
    device: str | None = None,
    progress: bool = True,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Train one fold (resuming from ``state.pt`` if present); return its summary.

    ``max_epochs`` stops this call after that many epochs (to test resuming).
    """
    processed, out_dir = Path(processed), Path(out_dir)
    check_fold(cfg, fold)
    with engine.running(device) as runtime:
        return _train(cfg, fold, processed, out_dir, runtime, progress, max_epochs)


def check_fold(cfg: Config, fold: int) -> None:
    """Fail before any work when ``fold`` is not one of the config's folds."""
    if not 0 <= fold < cfg.data.n_folds:
        raise config_mod.ConfigError(
            f"fold {fold} is not a fold of {cfg.name}, whose data.n_folds is {cfg.data.n_folds}: "
            f"use 0 to {cfg.data.n_folds - 1}"
        )


def _train(
    cfg: Config,
    fold: int,
    processed: Path,
    out_dir: Path,
    runtime: engine.Runtime,
    progress: bool,
    max_epochs: int | None,
) -> dict[str, Any]:
    seg = cfg.segmentation
    for stage in seg.stages:
        if stage.size not in cfg.data.sizes:
            raise config_mod.ConfigError(f"segmentation stage size {stage.size} is not in data.sizes {cfg.data.sizes}")
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(out_dir / "config.yaml", config_mod.dump(cfg))
    log = engine.make_logger(out_dir / "train.log", f"seg{fold}", runtime.is_main)
    rows = data.train_rows(processed)
    if fold not in set(rows["fold"]):
        raise ValueError(f"fold {fold} not in folds.csv (folds {sorted(set(rows['fold']))})")
    train_df, valid_df = rows[rows["fold"] != fold], rows[rows["fold"] == fold]
    engine.seed_everything(cfg.seed + fold, cfg.deterministic)
    log.info("segmentation fold %d on %s", fold, engine.describe_device(runtime.device))
    model = models.create_segmenter(seg, cfg.data.channels)
    if seg.encoder_init != "none":
        source = encoder_init_source(seg.encoder_init, out_dir, fold)
        report = models.init_encoder_from_classifier(model, models.load_state_dict_file(source))
        log.info(
            "encoder initialised from %s: all %d encoder tensors loaded, %d classifier tensors unused (%s...)",
            source,
            len(report["loaded"]),
            len(report["unused"]),
            ", ".join(report["unused"][:3]),
        )
    model.to(runtime.device)
    if seg.channels_last and runtime.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = losses.ComboLoss(seg.loss)
    plan = _plan(seg.stages)
    state_path = out_dir / "state.pt"
    done, history, best = 0, [], -1.0
    opt = sched = swa = None
    state = engine.load_checkpoint(state_path) if state_path.exists() else None
    if state is not None:
        done, history, best = state["done"], state["history"], state["best"]
        model.load_state_dict(state["model"])
        log.info("resuming fold %d after epoch %d of %d", fold, done, len(plan))

    def build_stage(s: int) -> tuple[Any, Any, Any]:
        stage = seg.stages[s]
        o = engine.optimizer_for(model.parameters(), stage.lr, stage.weight_decay)
        sc = engine.scheduler_for(
            o, stage.scheduler, stage.epochs, stage.min_lr, stage.plateau_factor, stage.plateau_patience
        )
        sw = AveragedModel(model) if stage.swa_epochs else None
        return o, sc, sw

    net = engine.wrap_ddp(model, runtime, seg.sync_bn)
    model = engine.unwrap(net)  # the module DDP wraps (SyncBatchNorm conversion may replace it)
    net = engine.compiled(net, cfg.compile)
    ran = 0
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.device.type == "cuda" and seg.amp == "fp16")
    current_stage = -1
    for step in range(done, len(plan)):
        s, e = plan[step]
        stage = seg.stages[s]
        if s != current_stage:
            opt, sched, swa = build_stage(s)
            if state is not None and step == done:  # resuming: continue exactly where the run stopped
                if state["stage"] == s and e > 0:
                    opt.load_state_dict(state["optimizer"])
                    sched.load_state_dict(state["scheduler"])
                    if swa is not None and state.get("swa") is not None:
                        swa.load_state_dict(state["swa"])
                    if state.get("scaler"):
                        scaler.load_state_dict(state["scaler"])
                engine.set_rng_state(state["rng"])
            current_stage = s
            train_ds = data.CacheDataset(
                processed,
                "train",
                stage.size,
                train_df["index"].to_numpy(),
                data.segmentation_augment(stage.augment, stage.size, stage.augment_p),
            )
            shard = valid_df["index"].to_numpy()[runtime.rank :: runtime.world_size]  # this rank's validation images
            valid_ds = data.CacheDataset(processed, "train", stage.size, shard)
            sampler = data.PositiveRateSampler(
                train_df["has_pneumothorax"].to_numpy(),
                stage.positive_rate,
                stage.positive_rate_end,
                stage.epochs,
                cfg.seed + 1000 * fold + s,
                runtime.rank,
                runtime.world_size,
            )
            batch = engine.rank_batch(stage.batch_size, runtime, f"segmentation.stages[{s}].batch_size")
            valid_loader = data.make_loader(valid_ds, batch, workers=cfg.data.workers)
            train_loader = data.make_loader(
                train_ds, batch, sampler, cfg.data.workers, drop_last=len(sampler) > batch, seed=cfg.seed + s
            )
        sampler.set_epoch(e)
        in_swa = stage.swa_epochs and e >= stage.epochs - stage.swa_epochs
        if in_swa and stage.swa_lr is not None:
            for group in opt.param_groups:
                group["lr"] = stage.swa_lr
        lr = opt.param_groups[0]["lr"]
        net.train()
        started = time.time()
        total = torch.zeros((), device=runtime.device)  # summed on the device: no host sync per step
        count = torch.zeros((), device=runtime.device)
        bar = tqdm(
            train_loader,
            desc=f"fold {fold} stage {s} epoch {e + 1}/{stage.epochs}",
            unit="batch",
            disable=not (progress and runtime.is_main),
            leave=False,
        )
        for images, masks in bar:
            x = data.model_input(images, cfg.data.channels, runtime.device, seg.channels_last)
            y = data.model_target(masks, runtime.device)
            with engine.autocast(runtime.device, seg.amp):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if seg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), seg.grad_clip)
            scaler.step(opt)
            scaler.update()
            total += loss.detach() * len(x)
            count += len(x)
        train_loss = engine.mean_over_ranks(total, count, runtime)
        if in_swa:
            swa.update_parameters(model)
        scores = evaluate(model, valid_loader, loss_fn, runtime, seg.amp, cfg.data.channels, seg.channels_last)
        val_dice = scores["val_dice"]  # the same on every rank
        if stage.scheduler == "plateau":
            sched.step(val_dice)
        elif not (in_swa and stage.swa_lr is not None):
            sched.step()
        row = {
            "epoch": step + 1,
            "stage": s,
            "size": stage.size,
            "kind": "epoch",
            "lr": lr,
            "train_loss": train_loss,
            **scores,
            "seconds": round(time.time() - started, 2),
        }
        history.append(row)
        log.info(
            "fold %d epoch %d/%d (stage %d, %dpx): loss %.4f val_dice %.4f val_iou %.4f lr %.2e",
            fold,
            step + 1,
            len(plan),
            s,
            stage.size,
            row["train_loss"],
            scores["val_dice"],
            scores["val_iou"],
            lr,
        )
        last_of_stage = e == stage.epochs - 1
        if runtime.is_main:
            if s == len(seg.stages) - 1 and scores["val_dice"] > best:
                best = scores["val_dice"]
                engine.save_checkpoint(out_dir / "best.pt", engine.cpu_state(model))
            engine.save_checkpoint(out_dir / "last.pt", engine.cpu_state(model))
        if last_of_stage and swa is not None:
            rows = _bn_rows(train_df["index"].to_numpy(), seg.swa_bn_images, cfg.seed + s, runtime)
            bn_ds = data.CacheDataset(processed, "train", stage.size, rows)
            bn_loader = data.make_loader(bn_ds, batch, workers=cfg.data.workers)
            # every rank now holds the same SWA weights (DDP keeps parameters equal) and statistics (all-reduced)
            engine.update_bn(swa.module, bn_loader, runtime, seg.amp, cfg.data.channels, seg.channels_last)
            swa_scores = evaluate(
                swa.module, valid_loader, loss_fn, runtime, seg.amp, cfg.data.channels, seg.channels_last
            )
            if runtime.is_main:
                history.append(
                    {
                        "epoch": step + 1,
                        "stage": s,
                        "size": stage.size,
                        "kind": "swa",
                        "lr": lr,
                        "train_loss": float("nan"),
                        **swa_scores,
                        "seconds": 0.0,
                    }
                )
                log.info(
                    "fold %d stage %d SWA over %d epochs: val_dice %.4f",
                    fold,
                    s,
                    stage.swa_epochs,
                    swa_scores["val_dice"],
                )
                name = "swa.pt" if s == len(seg.stages) - 1 else f"swa_stage{s}.pt"
                engine.save_checkpoint(out_dir / name, engine.cpu_state(swa.module))
            # The next stage starts from the SWA weights (stage-1 weights carried over).
            model.load_state_dict(swa.module.state_dict())
        if runtime.is_main:
            engine.save_checkpoint(
                state_path,
                {
                    "done": step + 1,
                    "stage": s,
                    "history": history,
                    "best": best,
                    "model": engine.cpu_state(model),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "swa": swa.state_dict() if swa is not None else None,
                    "scaler": scaler.state_dict(),
                    "rng": engine.rng_state(),
                },
            )
            metrics = pd.DataFrame(history)
            files.write_csv(out_dir / "metrics.csv", metrics)
            engine.plot_curves(
                metrics,
                out_dir / "curves.png",
                [
                    ("train_loss", "train loss"),
                    ("val_loss", "val loss"),
                    ("val_dice", "val Dice"),
                    ("val_iou", "val IoU"),
                ],
            )
        engine.barrier(runtime)
        ran += 1  # noqa: SIM113 (epochs run by this call, not the loop index)
        if max_epochs is not None and ran >= max_epochs and step + 1 < len(plan):
            raise Interrupted(f"stopped after {ran} epoch(s) as asked")
    summary: dict[str, Any] = {"fold": fold, "epochs": len(plan)}
    if runtime.is_main:
        summary.update(_finish(cfg, fold, processed, out_dir, valid_df, runtime, progress))
        log.info("fold %d done: %s", fold, summary)
    return summary


def _oof_scores(oof_path: Path, masks: np.ndarray, valid_df: pd.DataFrame, chunk: int = 64) -> tuple[float, float]:
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


def _bn_rows(rows: np.ndarray, limit: int, seed: int, runtime: engine.Runtime) -> np.ndarray:
    """This rank's share of a seeded subset of at most ``limit`` training images (all when ``limit`` is 0)."""
    if limit and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows[runtime.rank :: runtime.world_size]


def encoder_init_source(value: str, out_dir: Path, fold: int) -> Path:
    """``classifier`` (this experiment's classifier fold), ``pretrain`` (its external pre-training) or a path."""
    exp_dir = out_dir.parent
    if value == "classifier":
        return exp_dir / "classifier" / f"fold{fold}" / "model.pt"
    if value == "pretrain":
        return exp_dir / "pretrain" / "model.pt"
    return Path(value)


def weights_path(out_dir: Path, which: str) -> Path:
    """``best``/``last``/``swa`` weights of a fold; ``swa`` falls back to ``last`` when the stage had no SWA."""
    path = out_dir / f"{which}.pt"
    if which == "swa" and not path.exists():
        path = out_dir / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {which} weights; is the fold trained?")
    return path


def load_fold_model(cfg: Config, out_dir: Path, which: str, device: torch.device) -> torch.nn.Module:
    """Build the fold's segmenter (no download) and load its ``which`` weights."""
    seg = cfg.segmentation
    model = models.create_segmenter(replace(seg, encoder_weights="none"), cfg.data.channels)
    model.load_state_dict(models.load_state_dict_file(weights_path(out_dir, which)))
    model.to(device).eval()
    if seg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _finish(
    cfg: Config,
    fold: int,
    processed: Path,
    out_dir: Path,
    valid_df: pd.DataFrame,
    runtime: engine.Runtime,
    progress: bool,
) -> dict[str, Any]:
    """OOF predictions with the chosen weights, then ``model.pt`` (the done marker)."""
    seg = cfg.segmentation
    final = seg.stages[-1]
    model = load_fold_model(cfg, out_dir, seg.oof_weights, runtime.device)
    dataset = data.CacheDataset(processed, "train", final.size, valid_df["index"].to_numpy())
    infer.predict_to_file(
        [model],
        dataset,
        out_dir / "oof.npy",
        ("hflip",),
        runtime.device,
        cfg.data.channels,
        final.batch_size,
        seg.amp,
        seg.channels_last,
        progress=progress,
        desc=f"oof fold {fold}",
    )
    files.write_csv(out_dir / "oof_ids.csv", valid_df[["image_id", "index", "has_pneumothorax"]])
    oof_dice, empty = _oof_scores(
        out_dir / "oof.npy", prepare.load_cache(processed, "masks", "train", final.size), valid_df
    )
    engine.save_checkpoint(out_dir / "model.pt", models.load_state_dict_file(weights_path(out_dir, seg.oof_weights)))
    return {"oof_dice_at_0.5": oof_dice, "all_empty_dice": empty, "weights": seg.oof_weights}
