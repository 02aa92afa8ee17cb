"""``make leaderboard``: one table of every experiment and ensemble under ``models/``, best OOF score first.

Per row: the model (architecture, encoder, stage sizes), each fold's validation Dice (the final
stage's best epoch), the OOF score before post-processing (B-TH 0.5, at the maps' size) and
after it (the competition metric at 1024 on the original RLE), the chosen post-processing, the
test score where ``make score`` ran, and the training time (every epoch of every run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pneumothorax.io import atomic, tables
from pneumothorax.io import config as config_mod
from pneumothorax.io.errors import MissingFileError
from pneumothorax.io.paths import ExperimentDir, leaderboard
from pneumothorax.post import postprocess


def _training(exp: ExperimentDir, n_folds: int) -> tuple[list[float], float]:
    """Per fold: the final stage's best validation Dice; and the hours every run of the experiment trained."""
    dice, seconds = [], 0.0
    for k in range(n_folds):
        for run in (exp.segmenter(k), exp.classifier(k)):
            if run.metrics.exists():
                seconds += float(pd.read_csv(run.metrics)["seconds"].sum())
        if exp.segmenter(k).metrics.exists():
            m = pd.read_csv(exp.segmenter(k).metrics)
            dice.append(round(float(m[m["stage"] == m["stage"].max()]["val_dice"].max()), 4))
    return dice, seconds / 3600


def _model(exp: ExperimentDir) -> dict[str, Any]:
    if exp.ensemble.exists():
        record = json.loads(exp.ensemble.read_text())
        members = ", ".join(
            f"{m['experiment']} x{w:.2f}" for m, w in zip(record["members"], record["weights"], strict=True)
        )
        return {"kind": "ensemble", "model": members, "sizes": str(record["size"])}
    cfg = config_mod.from_yaml(exp.segmenter(0).config.read_text())
    seg = cfg.segmentation
    fold_dice, hours = _training(exp, cfg.data.n_folds)
    gate = f" + {cfg.classifier.model} gate" if cfg.classifier.enabled else ""
    return {
        "kind": "experiment",
        "model": f"{seg.arch} {seg.encoder}{gate}",
        "sizes": " -> ".join(str(s.size) for s in seg.stages),
        "fold_val_dice": " ".join(f"{d:.4f}" for d in fold_dice),
        "train_hours": round(hours, 3),
    }


def row(exp: ExperimentDir) -> dict[str, Any] | None:
    """One experiment's row, or None when it has not been searched (no OOF score yet)."""
    if not postprocess.adopt_old_name(exp).exists() or not (exp.ensemble.exists() or exp.segmenter(0).config.exists()):
        return None
    post, scores = postprocess.load(exp.postprocess)
    out = {"name": exp.name, **_model(exp)}
    out.update(
        oof_before=round(scores["no_postprocess_score"], 4),
        oof_after=round(scores.get("score_full_resolution", float("nan")), 4),
        postprocess=post.describe(),
        test=round(json.loads(exp.score.read_text())["score"], 4) if exp.score.exists() else None,
    )
    return out


def build(models_dir: Path) -> pd.DataFrame:
    """The table of every searched experiment under ``models_dir``, written as markdown and CSV beside them."""
    rows = [r for d in sorted(Path(models_dir).iterdir()) if d.is_dir() and (r := row(ExperimentDir(d))) is not None]
    if not rows:
        raise MissingFileError(f"{models_dir}: no searched experiment (run make search or make demo first)")
    table = pd.DataFrame(rows).sort_values("oof_after", ascending=False, na_position="last").reset_index(drop=True)
    csv_path, md_path = leaderboard(models_dir)
    atomic.write_csv(csv_path, table)
    columns = [c for c in table.columns if table[c].notna().any()]
    markdown = tables.markdown_table(columns, table[columns].itertuples(index=False))
    atomic.write_text(md_path, f"# Leaderboard ({len(table)} experiments, best OOF first)\n\n" + markdown)
    return table
