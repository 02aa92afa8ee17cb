"""``make report``: a markdown summary of an experiment and PNG panels of OOF cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from . import files, metric, prepare, submission


def _fold_table(cfg: Any, exp_dir: Path) -> pd.DataFrame:
    rows = []
    for k in range(cfg.data.n_folds):
        m = pd.read_csv(exp_dir / f"fold{k}" / "metrics.csv")
        last = m[m["stage"] == m["stage"].max()]
        row = {
            "fold": k,
            "best_val_dice": last["val_dice"].max(),
            "last_val_dice": last[last["kind"] == "epoch"]["val_dice"].iloc[-1],
        }
        swa = last[last["kind"] == "swa"]
        row["swa_val_dice"] = swa["val_dice"].iloc[-1] if len(swa) else float("nan")
        cls_path = exp_dir / "classifier" / f"fold{k}" / "metrics.json"
        if cfg.classifier.enabled and cls_path.exists():
            cls = json.loads(cls_path.read_text())
            row.update({f"gate_{key}": cls[key] for key in ("auc", "mcc", "precision", "recall", "accuracy")})
        rows.append(row)
    return pd.DataFrame(rows)


def _panel(
    images: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray], titles: list[str], path: Path
) -> None:
    tiles = []
    for image, truth, pred, title in zip(images, truths, preds, titles, strict=True):
        size = 256
        img = cv2.cvtColor(cv2.resize(image, (size, size)), cv2.COLOR_GRAY2BGR)
        for mask, colour in ((truth, (0, 200, 0)), (pred, (0, 0, 255))):
            small = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, colour, 1)
        cv2.putText(img, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1)
        tiles.append(img)
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[i : i + 4], axis=1) for i in range(0, len(tiles), 4)], axis=0)
    with files.atomic_path(path) as tmp:
        ok, png = cv2.imencode(".png", grid)
        tmp.write_bytes(png.tobytes())


def build(cfg: Any, exp_dir: Path, processed: Path, n_cases: int = 8) -> Path:
    """Write ``<exp_dir>/report/summary.md``, ``best.png`` and ``worst.png``; return the folder."""
    out = exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    post = json.loads((exp_dir / "thresholds.json").read_text())
    folds = _fold_table(cfg, exp_dir)
    size = cfg.segmentation.stages[-1].size
    images = prepare.load_cache(processed, "images", "train", size)
    masks = prepare.load_cache(processed, "masks", "train", size)
    gate = {}
    if cfg.classifier.enabled:
        for k in range(cfg.data.n_folds):
            oof = pd.read_csv(exp_dir / "classifier" / f"fold{k}" / "oof.csv", dtype={"image_id": str})
            gate.update(zip(oof["image_id"], oof["prob"], strict=True))
    cases = []
    for k in range(cfg.data.n_folds):
        probs = np.load(exp_dir / f"fold{k}" / "oof.npy", mmap_mode="r")
        ids = pd.read_csv(exp_dir / f"fold{k}" / "oof_ids.csv", dtype={"image_id": str})
        for i, (image_id, index) in enumerate(zip(ids["image_id"], ids["index"], strict=True)):
            truth = masks[index] > 0
            if not truth.any():
                continue  # positives only: on negatives the panel would show nothing
            pred = submission.final_mask(np.asarray(probs[i]), post, gate.get(image_id), truth.shape)
            cases.append((float(metric.dice_per_image(pred, truth)[0]), image_id, index, pred))
    cases.sort(key=lambda c: c[0])
    for name, chosen in (("worst", cases[:n_cases]), ("best", cases[::-1][:n_cases])):
        if chosen:
            _panel(
                [np.asarray(images[c[2]]) for c in chosen],
                [masks[c[2]] > 0 for c in chosen],
                [c[3] for c in chosen],
                [f"Dice {c[0]:.3f}" for c in chosen],
                out / f"{name}.png",
            )
    lines = [
        f"# Experiment `{cfg.name}`",
        "",
        "## Per-fold validation (final stage)",
        "",
        folds.to_markdown(index=False, floatfmt=".4f")
        if hasattr(folds, "to_markdown") and _has_tabulate()
        else "```\n" + folds.to_string(index=False) + "\n```",
        "",
        "## Out-of-fold score",
        "",
        f"- images: {post['n_images']} at {post['size']}x{post['size']}",
        f"- all-empty baseline: {post['all_empty_score']:.4f}",
        f"- B-TH 0.5, no post-processing: {post['no_postprocess_score']:.4f}",
        f"- after post-processing: **{post['score']:.4f}**",
        "",
        "## Chosen post-processing",
        "",
        "```json",
        json.dumps({k: v for k, v in post.items() if k not in ("min_component_scores",)}, indent=2),
        "```",
        "",
        "![Dice over B-TH x R-TH](../heatmap.png)",
        "",
        "## Cases (positive OOF images; green truth, red prediction)",
        "",
        "Best: ![best](best.png)",
        "",
        "Worst: ![worst](worst.png)",
        "",
    ]
    files.write_text(out / "summary.md", "\n".join(lines))
    return out


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
