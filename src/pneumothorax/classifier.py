"""Per-fold image-level classifier: the gate in front of the segmenter (timm, Xception by default).

Outputs under ``models/<exp>/classifier/fold<k>/``: ``config.yaml``, ``state.pt`` (resume),
``last.pt``, ``best.pt`` (by validation AUC), ``metrics.csv``, ``train.log``, ``curves.png``,
``oof.csv`` (image_id, label, prob), ``metrics.json`` (AUC, MCC, precision, recall, accuracy
at ``classifier.threshold``) and ``model.pt`` (best weights), written last.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import config as config_mod
from . import data, engine, files, infer, models
from .config import Config
from .train import Interrupted, _loader


def gate_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, MCC, precision, recall and accuracy of ``probs >= threshold`` against 0/1 ``labels``."""
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(probs) >= threshold).astype(int)
    auc = float(skm.roc_auc_score(labels, probs)) if len(set(labels)) == 2 else float("nan")
    return {
        "auc": auc,
        "mcc": float(skm.matthews_corrcoef(labels, pred)),
        "precision": float(skm.precision_score(labels, pred, zero_division=0)),
        "recall": float(skm.recall_score(labels, pred, zero_division=0)),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "threshold": float(threshold),
    }


def load_fold_classifier(cfg: Config, out_dir: Path, device: torch.device, which: str = "model") -> torch.nn.Module:
    """Build the classifier (no download) and load a fold's weights."""
    model = models.create_classifier(replace(cfg.classifier, pretrained="none"), cfg.data.channels)
    model.load_state_dict(models.load_state_dict_file(out_dir / f"{which}.pt"))
    return model.to(device).eval()


def train_classifier_fold(
    cfg: Config,
    fold: int,
    processed: str | Path,
    out_dir: str | Path,
    device: str | None = None,
    progress: bool = True,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Train one classifier fold (resuming from ``state.pt``); return its OOF metrics."""
    runtime = engine.setup_runtime(device)
    try:
        return _train(cfg, fold, Path(processed), Path(out_dir), runtime, progress, max_epochs)
    finally:
        engine.teardown(runtime)


def _train(
    cfg: Config,
    fold: int,
    processed: Path,
    out_dir: Path,
    runtime: engine.Runtime,
    progress: bool,
    max_epochs: int | None,
) -> dict[str, Any]:
    c = cfg.classifier
    if c.size not in cfg.data.sizes:
        raise config_mod.ConfigError(f"classifier.size {c.size} is not in data.sizes {cfg.data.sizes}")
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(out_dir / "config.yaml", config_mod.dump(cfg))
    log = engine.make_logger(out_dir / "train.log", f"cls{fold}", runtime.is_main)
    rows = data.train_rows(processed)
    train_df, valid_df = rows[rows["fold"] != fold], rows[rows["fold"] == fold]
    engine.seed_everything(cfg.seed + 100 + fold)
    model = models.create_classifier(c, cfg.data.channels).to(runtime.device)
    if c.channels_last and runtime.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = engine.optimizer_for(model.parameters(), c.lr, c.weight_decay)
    sched = engine.scheduler_for(opt, "cosine", c.epochs, c.min_lr)
    state_path = out_dir / "state.pt"
    done, history, best = 0, [], -1.0
    if state_path.exists():
        state = engine.load_checkpoint(state_path)
        done, history, best = state["done"], state["history"], state["best"]
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        engine.set_rng_state(state["rng"])
        log.info("resuming classifier fold %d after epoch %d of %d", fold, done, c.epochs)
    train_ds = data.CacheDataset(
        processed,
        "train",
        c.size,
        train_df["index"].to_numpy(),
        cfg.data.channels,
        data.classifier_augment(c.size, c.augment_p),
        target="label",
        labels=train_df["has_pneumothorax"].to_numpy(),
    )
    valid_ds = data.CacheDataset(
        processed,
        "train",
        c.size,
        valid_df["index"].to_numpy(),
        cfg.data.channels,
        target="label",
        labels=valid_df["has_pneumothorax"].to_numpy(),
    )
    sampler = data.PositiveRateSampler(
        train_df["has_pneumothorax"].to_numpy(),
        c.positive_rate,
        None,
        c.epochs,
        cfg.seed + 100 + fold,
        runtime.rank,
        runtime.world_size,
    )
    net: torch.nn.Module = model
    if runtime.distributed:
        net = DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.device.type == "cuda" and c.amp == "fp16")
    ran = 0
    for epoch in range(done, c.epochs):
        sampler.set_epoch(epoch)
        loader = _loader(
            train_ds,
            c.batch_size,
            sampler,
            cfg.data.workers,
            drop_last=len(sampler) > c.batch_size,
            seed=cfg.seed + epoch,
        )
        lr = opt.param_groups[0]["lr"]
        net.train()
        started, total, count = time.time(), 0.0, 0
        for x, y in tqdm(
            loader,
            desc=f"classifier fold {fold} epoch {epoch + 1}/{c.epochs}",
            unit="batch",
            disable=not (progress and runtime.is_main),
            leave=False,
        ):
            x, y = x.to(runtime.device), y.to(runtime.device)
            if c.channels_last and runtime.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with engine.autocast(runtime.device, c.amp):
                logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(x)
            count += len(x)
        sched.step()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "kind": "epoch",
            "lr": lr,
            "train_loss": total / max(1, count),
            "seconds": round(time.time() - started, 2),
        }
        if runtime.is_main:
            probs = infer.predict_labels([model], valid_ds, (), runtime.device, c.batch_size, c.amp, progress=False)
            labels = valid_df["has_pneumothorax"].to_numpy()
            row.update({f"val_{k}": v for k, v in gate_metrics(labels, probs, c.threshold).items() if k != "threshold"})
            row["val_loss"] = float(
                F.binary_cross_entropy(
                    torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6).double(), torch.from_numpy(labels).double()
                )
            )
            score = row["val_auc"] if not np.isnan(row["val_auc"]) else -row["val_loss"]
            if score > best:
                best = score
                engine.save_checkpoint(out_dir / "best.pt", engine.cpu_state(model))
            engine.save_checkpoint(out_dir / "last.pt", engine.cpu_state(model))
            history.append(row)
            log.info(
                "classifier fold %d epoch %d/%d: loss %.4f val_auc %.4f val_mcc %.4f",
                fold,
                epoch + 1,
                c.epochs,
                row["train_loss"],
                row["val_auc"],
                row["val_mcc"],
            )
            engine.save_checkpoint(
                state_path,
                {
                    "done": epoch + 1,
                    "history": history,
                    "best": best,
                    "model": engine.cpu_state(model),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": engine.rng_state(),
                },
            )
            frame = pd.DataFrame(history)
            files.write_csv(out_dir / "metrics.csv", frame)
            engine.plot_curves(
                frame,
                out_dir / "curves.png",
                [("train_loss", "train loss"), ("val_loss", "val loss"), ("val_auc", "val AUC")],
            )
        engine.barrier(runtime)
        ran += 1  # noqa: SIM113 (epochs run by this call, not the loop index)
        if max_epochs is not None and ran >= max_epochs and epoch + 1 < c.epochs:
            raise Interrupted(f"stopped after {ran} epoch(s) as asked")
    summary: dict[str, Any] = {"fold": fold}
    if runtime.is_main:
        best_model = load_fold_classifier(cfg, out_dir, runtime.device, "best")
        probs = infer.predict_labels(
            [best_model], valid_ds, ("hflip",), runtime.device, c.batch_size, c.amp, progress=False
        )
        oof = pd.DataFrame(
            {
                "image_id": valid_df["image_id"].to_numpy(),
                "label": valid_df["has_pneumothorax"].to_numpy(),
                "prob": probs,
            }
        )
        files.write_csv(out_dir / "oof.csv", oof)
        summary.update(gate_metrics(oof["label"].to_numpy(), probs, c.threshold))
        files.write_json(out_dir / "metrics.json", summary)
        engine.save_checkpoint(out_dir / "model.pt", models.load_state_dict_file(out_dir / "best.pt"))
        log.info("classifier fold %d done: %s", fold, summary)
    return summary
