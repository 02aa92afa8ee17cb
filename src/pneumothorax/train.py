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
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import config as config_mod
from . import data, engine, files, infer, losses, metric, models, prepare
from .config import Config, StageConfig


class Interrupted(RuntimeError):
    """Raised by ``max_epochs`` to simulate a killed run (tests)."""


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: DataLoader, loss_fn: Any, runtime: engine.Runtime, amp: str, channels_last: bool
) -> dict[str, float]:
    """Validation loss, competition Dice (p > 0.5) and IoU over a loader."""
    model.eval()
    dices, ious, total_loss, n = [], [], 0.0, 0
    for x, y in loader:
        x, y = x.to(runtime.device), y.to(runtime.device)
        if channels_last and runtime.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with engine.autocast(runtime.device, amp):
            logits = model(x)
        total_loss += float(loss_fn(logits.float(), y)) * len(x)
        n += len(x)
        pred = (logits.float() > 0).cpu().numpy()[:, 0]
        truth = y.cpu().numpy()[:, 0] > 0.5
        dices.append(metric.dice_per_image(pred, truth))
        ious.append(metric.iou_per_image(pred, truth))
    return {
        "val_loss": total_loss / max(1, n),
        "val_dice": float(np.concatenate(dices).mean()) if dices else float("nan"),
        "val_iou": float(np.concatenate(ious).mean()) if ious else float("nan"),
    }


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
    if net is not model:
        model = engine.unwrap(net)  # SyncBatchNorm conversion makes a new module
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
                cfg.data.channels,
                data.segmentation_augment(stage.augment, stage.size, stage.augment_p),
            )
            valid_ds = data.CacheDataset(
                processed, "train", stage.size, valid_df["index"].to_numpy(), cfg.data.channels
            )
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
        for x, y in bar:
            x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
            if seg.channels_last and runtime.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
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
        scores = {"val_loss": float("nan"), "val_dice": float("nan"), "val_iou": float("nan")}
        if runtime.is_main:
            scores = evaluate(model, valid_loader, loss_fn, runtime, seg.amp, seg.channels_last)
        val_dice = engine.broadcast_float(scores["val_dice"], runtime)
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
            bn_ds = data.CacheDataset(processed, "train", stage.size, train_df["index"].to_numpy(), cfg.data.channels)
            update_bn(data.make_loader(bn_ds, stage.batch_size, workers=cfg.data.workers), swa, device=runtime.device)
            engine.broadcast_module(swa.module, runtime)
            if runtime.is_main:
                swa_scores = evaluate(swa.module, valid_loader, loss_fn, runtime, seg.amp, seg.channels_last)
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
    dataset = data.CacheDataset(processed, "train", final.size, valid_df["index"].to_numpy(), cfg.data.channels)
    infer.predict_to_file(
        [model],
        dataset,
        out_dir / "oof.npy",
        ("hflip",),
        runtime.device,
        final.batch_size,
        seg.amp,
        seg.channels_last,
        progress=progress,
        desc=f"oof fold {fold}",
    )
    files.write_csv(out_dir / "oof_ids.csv", valid_df[["image_id", "index", "has_pneumothorax"]])
    probs = np.load(out_dir / "oof.npy", mmap_mode="r")
    masks = prepare.load_cache(processed, "masks", "train", final.size)[valid_df["index"].to_numpy()]
    oof_dice = metric.mean_dice(np.asarray(probs) > 127, masks > 0)
    empty = metric.mean_dice(np.zeros_like(masks, dtype=bool), masks > 0)
    engine.save_checkpoint(out_dir / "model.pt", models.load_state_dict_file(weights_path(out_dir, seg.oof_weights)))
    return {"oof_dice_at_0.5": oof_dice, "all_empty_dice": empty, "weights": seg.oof_weights}
