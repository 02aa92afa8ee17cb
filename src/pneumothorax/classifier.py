"""Per-fold image-level classifier: the gate in front of the segmenter (timm, Xception by default).

Outputs under ``models/<exp>/classifier/fold<k>/``: ``config.yaml``, ``state.pt`` (resume),
``last.pt``, ``best.pt`` (by validation AUC), ``metrics.csv``, ``train.log``, ``curves.png``,
``oof.csv`` (image_id, label, prob), ``metrics.json`` (AUC, MCC, precision, recall, accuracy
at ``classifier.threshold``) and ``model.pt`` (best weights), written last.

:func:`pretrain_external` trains the same classifier on an external weakly-labelled set (a CSV
of image paths and labels, e.g. ChestX-ray14 or CheXpert downloads) into
``models/<exp>/pretrain/``; a segmentation config then initialises its encoder from it with
``segmentation.encoder_init: pretrain``.
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
from tqdm import tqdm

from . import config as config_mod
from . import data, engine, files, infer, models
from .config import Config
from .train import Interrupted, check_fold


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
    check_fold(cfg, fold)
    with engine.running(device) as runtime:
        return _train(cfg, fold, Path(processed), Path(out_dir), runtime, progress, max_epochs)


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
    rows = data.train_rows(processed)
    train_df, valid_df = rows[rows["fold"] != fold], rows[rows["fold"] == fold]
    train_ds = data.CacheDataset(
        processed,
        "train",
        c.size,
        train_df["index"].to_numpy(),
        data.classifier_augment(c.size, c.augment_p),
        target="label",
        labels=train_df["has_pneumothorax"].to_numpy(),
    )
    valid_ds = data.CacheDataset(
        processed,
        "train",
        c.size,
        valid_df["index"].to_numpy(),
        target="label",
        labels=valid_df["has_pneumothorax"].to_numpy(),
    )
    train_part = (train_ds, train_df["has_pneumothorax"].to_numpy())
    valid_part = (valid_ds, valid_df["has_pneumothorax"].to_numpy(), valid_df["image_id"].to_numpy())
    return _fit(cfg, f"fold {fold}", fold, train_part, valid_part, out_dir, runtime, progress, max_epochs)


def _fit(
    cfg: Config,
    name: str,
    key: int,
    train_part: tuple[Any, np.ndarray],
    valid_part: tuple[Any, np.ndarray, np.ndarray],
    out_dir: Path,
    runtime: engine.Runtime,
    progress: bool,
    max_epochs: int | None,
) -> dict[str, Any]:
    """The training loop shared by fold training and external pre-training (``key`` seeds it)."""
    c = cfg.classifier
    train_ds, train_labels = train_part
    valid_ds, labels, valid_ids = valid_part
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(out_dir / "config.yaml", config_mod.dump(cfg))
    log = engine.make_logger(out_dir / "train.log", f"cls{key}", runtime.is_main)
    engine.seed_everything(cfg.seed + 100 + key, cfg.deterministic)
    log.info("classifier %s on %s", name, engine.describe_device(runtime.device))
    model = models.create_classifier(c, cfg.data.channels).to(runtime.device)
    if c.channels_last and runtime.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = engine.optimizer_for(model.parameters(), c.lr, c.weight_decay)
    sched = engine.scheduler_for(opt, "cosine", c.epochs, c.min_lr)
    state_path = out_dir / "state.pt"
    done, history, best = 0, [], -1.0
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.device.type == "cuda" and c.amp == "fp16")
    if state_path.exists():
        state = engine.load_checkpoint(state_path)
        done, history, best = state["done"], state["history"], state["best"]
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        engine.set_rng_state(state["rng"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resuming classifier %s after epoch %d of %d", name, done, c.epochs)
    sampler = data.PositiveRateSampler(
        train_labels, c.positive_rate, None, c.epochs, cfg.seed + 100 + key, runtime.rank, runtime.world_size
    )
    net = engine.compiled(engine.wrap_ddp(model, runtime), cfg.compile)
    ran = 0
    batch = engine.rank_batch(c.batch_size, runtime, "classifier.batch_size")
    loader = data.make_loader(train_ds, batch, sampler, cfg.data.workers, drop_last=len(sampler) > batch, seed=cfg.seed)
    for epoch in range(done, c.epochs):
        sampler.set_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        net.train()
        started = time.time()
        total = torch.zeros((), device=runtime.device)  # summed on the device: no host sync per step
        count = torch.zeros((), device=runtime.device)
        for images, labels_batch in tqdm(
            loader,
            desc=f"classifier {name} epoch {epoch + 1}/{c.epochs}",
            unit="batch",
            disable=not (progress and runtime.is_main),
            leave=False,
        ):
            x = data.model_input(images, cfg.data.channels, runtime.device, c.channels_last)
            y = data.model_target(labels_batch, runtime.device)
            with engine.autocast(runtime.device, c.amp):
                logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach() * len(x)
            count += len(x)
        sched.step()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "kind": "epoch",
            "lr": lr,
            "train_loss": engine.mean_over_ranks(total, count, runtime),
            "seconds": round(time.time() - started, 2),
        }
        shard = torch.utils.data.Subset(valid_ds, range(runtime.rank, len(valid_ds), runtime.world_size))
        mine = infer.predict_labels(
            [model], shard, (), runtime.device, cfg.data.channels, c.batch_size, c.amp, progress=False
        )
        probs = engine.gather_shards(mine, len(valid_ds), runtime)  # every rank predicted its share
        if runtime.is_main:
            row.update({f"val_{k}": v for k, v in gate_metrics(labels, probs, c.threshold).items() if k != "threshold"})
            row["val_loss"] = float(
                F.binary_cross_entropy(
                    torch.tensor(probs, dtype=torch.float64).clamp(1e-6, 1 - 1e-6),
                    torch.tensor(labels, dtype=torch.float64),
                )
            )
            score = row["val_auc"] if not np.isnan(row["val_auc"]) else -row["val_loss"]
            if score > best:
                best = score
                engine.save_checkpoint(out_dir / "best.pt", engine.cpu_state(model))
            engine.save_checkpoint(out_dir / "last.pt", engine.cpu_state(model))
            history.append(row)
            log.info(
                "classifier %s epoch %d/%d: loss %.4f val_auc %.4f val_mcc %.4f",
                name,
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
                    "scaler": scaler.state_dict(),
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
    summary: dict[str, Any] = {"fold": key} if name.startswith("fold") else {}
    if runtime.is_main:
        best_model = load_fold_classifier(cfg, out_dir, runtime.device, "best")
        probs = infer.predict_labels(
            [best_model], valid_ds, ("hflip",), runtime.device, cfg.data.channels, c.batch_size, c.amp, progress=False
        )
        oof = pd.DataFrame(
            {
                "image_id": valid_ids,
                "label": labels,
                "prob": probs,
            }
        )
        files.write_csv(out_dir / "oof.csv", oof)
        summary.update(gate_metrics(oof["label"].to_numpy(), probs, c.threshold))
        files.write_json(out_dir / "metrics.json", summary)
        engine.save_checkpoint(out_dir / "model.pt", models.load_state_dict_file(out_dir / "best.pt"))
        log.info("classifier %s done: %s", name, summary)
    return summary


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
    rng = np.random.default_rng(cfg.seed)
    valid = rng.random(len(table)) < holdout
    if valid.all() or not valid.any():
        valid = np.arange(len(table)) % 10 == 0
    train_df, valid_df = table[~valid], table[valid]
    train_ds = data.ImageListDataset(
        train_df["path"].tolist(),
        train_df["label"].to_numpy(),
        c.size,
        data.classifier_augment(c.size, c.augment_p),
    )
    valid_ds = data.ImageListDataset(valid_df["path"].tolist(), valid_df["label"].to_numpy(), c.size)
    with engine.running(device) as runtime:
        return _fit(
            cfg,
            "pretrain",
            999,
            (train_ds, train_df["label"].to_numpy()),
            (valid_ds, valid_df["label"].to_numpy(), valid_df["path"].to_numpy()),
            Path(out_dir),
            runtime,
            progress,
            max_epochs,
        )
