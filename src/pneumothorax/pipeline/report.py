"""``make report``: a markdown summary of an experiment and PNG panels of OOF cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pneumothorax.data import prepared
from pneumothorax.io import atomic, metric, tables
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.pipeline import search
from pneumothorax.post import postprocess
from pneumothorax.post.postprocess import PostProcess


def _fold_table(cfg: Config, exp: ExperimentDir) -> pd.DataFrame:
    """Per fold: the final stage's best, last and SWA validation Dice, the OOF Dice at 0.5 (with ``infer.tta``),
    and the gate's metrics on the OOF images."""
    rows = []
    oof = json.loads(exp.oof_summary.read_text())["folds"] if exp.oof_summary.exists() else []
    for k in range(cfg.data.n_folds):
        m = pd.read_csv(exp.segmenter(k).metrics)
        last = m[m["stage"] == m["stage"].max()]
        swa = last[last["kind"] == "swa"]
        row = {
            "fold": k,
            "best_val_dice": last["val_dice"].max(),
            "last_val_dice": last[last["kind"] == "epoch"]["val_dice"].iloc[-1],
            "swa_val_dice": swa["val_dice"].iloc[-1] if len(swa) else float("nan"),
        }
        fold = next((f for f in oof if f["fold"] == k), {})
        row["oof_dice_at_0.5"] = fold.get("dice_at_0.5", float("nan"))
        if "classifier" in fold:
            gate = fold["classifier"]
            row.update({f"gate_{key}": gate[key] for key in ("auc", "mcc", "precision", "recall", "accuracy")})
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
    with atomic.atomic_path(path) as tmp:
        ok, png = cv2.imencode(".png", grid)
        tmp.write_bytes(png.tobytes())


def _cases(cfg: Config, exp: ExperimentDir, processed: ProcessedDir, post: PostProcess) -> list[tuple]:
    """(Dice, image id, cache row, predicted mask) of every positive OOF image, worst first."""
    masks = prepared.load_cache(processed.root, "masks", "train", cfg.final_size)
    cases = []
    for part in search.oof_folds(cfg, exp):
        for i, index in enumerate(part.ids["index"]):
            truth = masks[index] > 0
            if not truth.any():
                continue  # positives only: on negatives the panel would show nothing
            gate = None if part.gate is None else float(part.gate[i])
            pred = post.apply(np.asarray(part.maps[i]), gate, truth.shape)
            cases.append((float(metric.dice_per_image(pred, truth)[0]), part.ids["image_id"].iloc[i], index, pred))
    return sorted(cases, key=lambda c: c[0])


def build(cfg: Config, exp: ExperimentDir, processed: ProcessedDir, n_cases: int = 8) -> Path:
    """Write ``report/summary.md`` and the panels of positive OOF images, truth in green and prediction in red:
    ``worst.png`` and ``best.png`` by Dice, ``largest.png`` by the truth's area; return the folder."""
    exp.report.mkdir(parents=True, exist_ok=True)
    post, scores = postprocess.load(exp.postprocess)
    cases = _cases(cfg, exp, processed, post)
    images = prepared.load_cache(processed.root, "images", "train", cfg.final_size)
    masks = prepared.load_cache(processed.root, "masks", "train", cfg.final_size)
    largest = sorted(cases, key=lambda c: -int(np.count_nonzero(masks[c[2]])))  # where the truth lies, plainly
    for name, chosen in (("worst", cases[:n_cases]), ("best", cases[::-1][:n_cases]), ("largest", largest[:n_cases])):
        if chosen:
            _panel(
                [np.asarray(images[c[2]]) for c in chosen],
                [masks[c[2]] > 0 for c in chosen],
                [c[3] for c in chosen],
                [f"Dice {c[0]:.3f}" for c in chosen],
                exp.report / f"{name}.png",
            )
    atomic.write_text(exp.summary, _summary(cfg, exp, post, scores))
    return exp.report


def _summary(cfg: Config, exp: ExperimentDir, post: PostProcess, scores: dict[str, Any]) -> str:
    folds = _fold_table(cfg, exp)
    table = tables.markdown_table(folds.columns, folds.itertuples(index=False), digits=4)
    lines = [
        f"# Experiment `{cfg.name}`",
        "",
        "## Per-fold validation (final stage)",
        "",
        table,
        "",
        "## Out-of-fold score",
        "",
        f"- images: {scores['n_images']}, maps at {scores['size']}x{scores['size']}",
        f"- all-empty baseline: {scores['all_empty_score']:.4f} at {scores['size']}, "
        f"{scores['full_resolution']['all_empty_score']:.4f} at 1024 on the original RLE (a positive whose mask "
        "vanishes at the search size counts as empty there)",
        f"- B-TH 0.5, no post-processing (search resolution): {scores['no_postprocess_score']:.4f}",
        f"- after post-processing, search estimate at {scores['size']}: {scores['score_search']:.4f}",
        f"- after post-processing, competition metric at 1024 on the original RLE: "
        f"**{scores['score_full_resolution']:.4f}**",
        "",
        "## Chosen post-processing",
        "",
        f"{post.describe()}",
        "",
        "```json",
        json.dumps(post.to_dict(), indent=2),
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
    return "\n".join(lines)
