"""Ensembles across experiments: averaged OOF and test maps, searched post-processing, one submission.

``make ensemble ENSEMBLE="exp_a exp_b" NAME=ens1`` averages the members' out-of-fold maps and
test maps, image by image (members may differ in encoder, architecture and final resolution:
maps are brought to the largest final size, bilinearly), with equal weights or weights searched on
the OOF maps, and averages the gate probabilities of the members that have a gate. The ensemble's
folder ``models/ens1/`` then has the layout of an experiment (``oof.npy`` with ``oof_ids.csv``,
``test/``, ``postprocess.json``), so search, full-resolution re-scoring and submission run exactly
as for one experiment. Memory stays bounded: maps are read, resized and written a chunk of images
at a time into memory-mapped files.
"""

from __future__ import annotations

import itertools
import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from pneumothorax.data import prepared
from pneumothorax.io import atomic, progress_bars, tables
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, ProcessedDir
from pneumothorax.pipeline import search
from pneumothorax.post import exact_search, postprocess

CHUNK = 64  # images per read-resize-write step


@dataclass(frozen=True)
class Member:
    """One experiment of an ensemble: its config, folder, and where each image's OOF map lies."""

    cfg: Config
    exp: ExperimentDir

    @property
    def name(self) -> str:
        return self.exp.name


@dataclass(frozen=True)
class Maps:
    """Rows of maps from several files, addressed by image id: (file, row) per image."""

    sources: list[np.ndarray]
    where: dict[str, tuple[int, int]]

    def read(self, image_ids: list[str], size: int) -> np.ndarray:
        """The maps of ``image_ids`` as float32 p in [0, 1] at ``size`` x ``size``."""
        out = np.empty((len(image_ids), size, size), np.float32)
        for i, image_id in enumerate(image_ids):
            source, row = self.where[image_id]
            probs = np.asarray(self.sources[source][row], dtype=np.float32) / 255.0
            out[i] = probs if probs.shape[0] == size else cv2.resize(probs, (size, size), cv2.INTER_LINEAR)
        return out


def oof_maps(member: Member) -> tuple[Maps, pd.DataFrame]:
    """A member's OOF maps (every fold, its split checked) and their ids in fold order."""
    parts = list(search.oof_folds(member.cfg, member.exp))
    where, ids = {}, []
    for k, part in enumerate(parts):
        where.update({image_id: (k, i) for i, image_id in enumerate(part.ids["image_id"])})
        ids.append(part.ids.assign(gate=part.gate if part.gate is not None else np.nan))
    return Maps([p.maps for p in parts], where), pd.concat(ids, ignore_index=True)


def test_maps(member: Member) -> tuple[Maps, pd.DataFrame]:
    """A member's test maps and its ``ids.csv`` with the gate probabilities (NaN where the gate is off)."""
    ids = pd.read_csv(member.exp.test_ids, dtype={"image_id": str}, keep_default_na=False)
    gate = pd.read_csv(member.exp.test_gate, dtype={"image_id": str})
    gate_of = dict(zip(gate["image_id"], gate["prob"], strict=True)) if member.cfg.classifier.enabled else {}
    ids["gate"] = ids["image_id"].map(gate_of).astype(float)
    good = ids[ids["row"] >= 0]
    where = {image_id: (0, int(row)) for image_id, row in zip(good["image_id"], good["row"], strict=True)}
    return Maps([np.load(member.exp.test_maps, mmap_mode="r")], where), ids


def blend(
    sources: list[Maps],
    weights: np.ndarray,
    image_ids: list[str],
    size: int,
    out_path: Path,
    desc: str,
    progress: bool = True,
) -> Path:
    """The weighted mean of every source's map of each image, uint8 p*255, written a chunk at a time."""
    with atomic.atomic_path(out_path) as tmp:
        out = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(image_ids), size, size))
        for start in progress_bars.bar(range(0, len(image_ids), CHUNK), desc, progress, unit="chunk"):
            chunk = image_ids[start : start + CHUNK]
            total = sum(w * source.read(chunk, size) for w, source in zip(weights, sources, strict=True))
            out[start : start + len(chunk)] = np.clip(np.rint(total * 255.0), 0, 255).astype(np.uint8)
            out.flush()
            for array in [out, *(a for source in sources for a in source.sources)]:
                release(array)
        out.flush()
        del out
    return out_path


def release(array: np.ndarray) -> None:
    """Let the kernel drop the pages of a memory-mapped file this process has read or written (they stay in
    the page cache): otherwise every member's maps would count in this process's resident memory."""
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


def mean_gate(tables: list[pd.DataFrame], image_ids: list[str]) -> np.ndarray | None:
    """The mean gate probability over the members that have a gate (None when none has)."""
    gated = [t.set_index("image_id")["gate"].reindex(image_ids) for t in tables if t["gate"].notna().any()]
    return None if not gated else np.mean(np.stack([g.to_numpy(float) for g in gated]), axis=0)


def weight_grid(n: int, step: float = 0.25) -> list[np.ndarray]:
    """Every weight vector on the simplex with this step (equal weights first)."""
    ticks = np.round(np.arange(0, 1 + 1e-9, step), 6)
    grid = [np.array(w) for w in itertools.product(ticks, repeat=n) if abs(sum(w) - 1) < 1e-6]
    return [np.full(n, 1 / n), *grid]


def _members_agree(members: list[Member], tables: list[pd.DataFrame], what: str) -> None:
    first = set(tables[0]["image_id"])
    for member, table in zip(members[1:], tables[1:], strict=True):
        if set(table["image_id"]) != first:
            missing = sorted(first ^ set(table["image_id"]))[0]
            raise ValueError(f"{member.name}'s {what} and {members[0].name}'s differ in their images (e.g. {missing})")


def _score_weights(
    sources: list[Maps], ids: pd.DataFrame, truth: search.CacheRows, gate: Any, cfg: Config, out: Path, progress: bool
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The weight vector whose blend scores best on the OOF maps after the post-processing search."""
    tried = []
    for weights in weight_grid(len(sources)):
        blend(sources, weights, ids["image_id"].tolist(), truth.shape[1], out, "weights", progress=False)
        found = exact_search.search_oof(
            [exact_search.OOFPart(np.load(out, mmap_mode="r"), truth, gate)], cfg.postprocess
        )
        tried.append({"weights": weights.round(4).tolist(), "score_search": found.score})
        if progress:
            print(f"weights {weights.round(3).tolist()}: OOF {found.score:.4f}")
    best = max(tried, key=lambda t: t["score_search"])
    return np.asarray(best["weights"]), tried


def ensemble_oof(
    members: list[Member], out: ExperimentDir, processed: ProcessedDir, weights_mode: str, progress: bool = True
) -> dict[str, Any]:
    """Blend the members' OOF maps, search post-processing on them, re-score at 1024; return the result."""
    loaded = [oof_maps(m) for m in members]
    _members_agree(members, [t for _, t in loaded], "out-of-fold images")
    ids = loaded[0][1][["image_id", "index", "has_pneumothorax"]]
    image_ids = ids["image_id"].tolist()
    sources, gate = [maps for maps, _ in loaded], mean_gate([t for _, t in loaded], image_ids)
    truth = search.CacheRows(
        prepared.load_cache(processed.root, "masks", "train", out.final_size), ids["index"].to_numpy()
    )
    out.root.mkdir(parents=True, exist_ok=True)
    maps_path, cfg = out.blended_oof, members[0].cfg
    weights, tried = np.full(len(members), 1 / len(members)), []
    if weights_mode == "search":
        weights, tried = _score_weights(sources, ids, truth, gate, cfg, maps_path, progress)
    blend(sources, weights, image_ids, out.final_size, maps_path, "ensemble OOF", progress)
    atomic.write_csv(out.blended_ids, ids)
    maps = np.load(maps_path, mmap_mode="r")
    found = exact_search.search_oof([exact_search.OOFPart(maps, truth, gate)], cfg.postprocess)
    part = search.FoldOOF(ids, maps, gate)
    full = search.rescore_full([part], found.post, prepared.labels_path(processed.root), progress)
    return {"weights": weights.tolist(), "weights_tried": tried, "found": found, "full": full}


def ensemble_test(members: list[Member], out: ExperimentDir, weights: list[float], progress: bool = True) -> None:
    """Blend the members' test maps (an image any member could not read stays -1) and their gates."""
    loaded = [test_maps(m) for m in members]
    _members_agree(members, [t for _, t in loaded], "test images")
    ids = loaded[0][1][["image_id", "row", "error"]].copy()
    readable = np.all([t.set_index("image_id")["row"].reindex(ids["image_id"]).to_numpy() >= 0 for _, t in loaded], 0)
    good = ids["image_id"][readable].tolist()
    blend([m for m, _ in loaded], np.asarray(weights), good, out.final_size, out.test_maps, "ensemble test", progress)
    gate = mean_gate([t for _, t in loaded], good)
    atomic.write_csv(out.test_gate, pd.DataFrame({"image_id": good, "prob": 1.0 if gate is None else gate}))
    ids["row"] = -1
    ids.loc[readable, "row"] = np.arange(len(good))
    atomic.write_csv(out.test_ids, ids)


def member_summary(member: Member) -> dict[str, Any]:
    """What the ensemble report shows of a member: model, resolution, its own OOF and test scores."""
    seg = member.cfg.segmentation
    row = {"experiment": member.name, "arch": seg.arch, "encoder": seg.encoder, "size": member.cfg.final_size}
    if postprocess.adopt_old_name(member.exp).exists():
        _, scores = postprocess.load(member.exp.postprocess)
        row.update(oof_full=scores.get("score_full_resolution"), oof_search=scores.get("score_search"))
    if member.exp.score.exists():
        row["test"] = json.loads(member.exp.score.read_text())["score"]
    return row


def build(
    members: list[Member],
    out: ExperimentDir,
    processed: ProcessedDir,
    weights_mode: str = "equal",
    progress: bool = True,
) -> dict[str, Any]:
    """The whole ensemble step: OOF blend and search, test blend, ``postprocess.json``, ``ensemble.json``."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs two experiments or more, got {[m.name for m in members]}")
    oof = ensemble_oof(members, out, processed, weights_mode, progress)
    ensemble_test(members, out, oof["weights"], progress)
    r_values = list(members[0].cfg.postprocess.r_th)
    result = search.write_decision(out, oof["found"], oof["full"], r_values, out.final_size)
    record = {
        "members": [member_summary(m) for m in members],
        "weights": oof["weights"],
        "weights_mode": weights_mode,
        "size": out.final_size,
        "weights_tried": oof["weights_tried"],
    }
    atomic.write_json(out.ensemble, record)
    return {**result, **record}


def shared_split(members: list[Member], image_ids: list[str]) -> np.ndarray:
    """The fold of each of ``image_ids`` in the one split every member was trained on (``folds.csv``)."""
    splits = [pd.read_csv(m.exp.folds, dtype={"image_id": str}).set_index("image_id")["fold"] for m in members]
    first = splits[0].reindex(image_ids)
    if first.isna().any():
        raise ValueError(f"{members[0].exp.folds}: {int(first.isna().sum())} out-of-fold images have no fold")
    for m, split in zip(members[1:], splits[1:], strict=True):
        if not split.reindex(image_ids).equals(first):
            raise ValueError(
                f"{m.name} and {members[0].name} were trained on other splits ({m.exp.folds} against "
                f"{members[0].exp.folds}): leaving one fold out needs one split"
            )
    return first.to_numpy(int)


def blended_rows(members: list[Member], out: ExperimentDir) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """The rows of the ensemble's blended OOF maps (``oof_ids.csv``), the fold of each in the members' shared split,
    and the members' mean gate probability of each (None when no member has a gate)."""
    ids = pd.read_csv(out.blended_ids, dtype={"image_id": str})
    image_ids = ids["image_id"].tolist()
    return ids, shared_split(members, image_ids), mean_gate([oof_maps(m)[1] for m in members], image_ids)


def oof_parts(members: list[Member], out: ExperimentDir, processed: ProcessedDir) -> list[exact_search.OOFPart]:
    """The ensemble's blended OOF maps as the search reads them, one part per fold of the members' shared split:
    the maps, their truth and the members' mean gate probability."""
    ids, fold_of, gate = blended_rows(members, out)
    maps = np.load(out.blended_oof, mmap_mode="r")
    masks = prepared.load_cache(processed.root, "masks", "train", out.final_size)
    parts = []
    for k in np.unique(fold_of):
        rows = np.flatnonzero(fold_of == k)
        truth = search.CacheRows(masks, ids["index"].to_numpy()[rows])
        parts.append(exact_search.OOFPart(np.asarray(maps[rows]), truth, None if gate is None else gate[rows]))
    return parts


def crossfit(members: list[Member], out: ExperimentDir, processed: ProcessedDir) -> dict[str, Any]:
    """The search left one fold out (``exact_search.crossfit_oof``) on the ensemble's blended OOF maps, its folds
    the members' shared split; writes nothing. What the in-sample gain of ``build`` overstates, as for one run."""
    return exact_search.crossfit_oof(oof_parts(members, out, processed), members[0].cfg.postprocess)


def report(record: dict[str, Any], out: ExperimentDir, test_score: float | None) -> Path:
    """``report/summary.md``: each member's scores beside the ensemble's."""
    table = pd.DataFrame(record["members"])
    ensemble_row = {
        "experiment": f"**{out.name}** (ensemble)",
        "size": record["size"],
        "oof_full": record["score_full_resolution"],
        "oof_search": record["score_search"],
        "test": test_score,
    }
    table = pd.concat([table, pd.DataFrame([ensemble_row])], ignore_index=True)
    lines = [
        f"# Ensemble `{out.name}`",
        "",
        f"Weights: {record['weights']} (at {record['size']} px)",
        "",
        "OOF: the competition metric at 1024 on the original RLE after post-processing (`oof_full`), and the "
        "search's estimate at the maps' size (`oof_search`); test: `make score` against the labels, where given.",
        "",
        tables.markdown_table(table.columns, table.itertuples(index=False), digits=4),
        "",
        f"Post-processing: {postprocess.PostProcess.from_dict(record['postprocess']).describe()}",
        "",
        "![OOF Dice over B-TH x R-TH](../heatmap.png)",
        "",
    ]
    out.report.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out.summary, "\n".join(lines))
    return out.summary


def member(cfg: Config, models_dir: Path) -> Member:
    """The member experiment ``cfg.name`` under ``models_dir``."""
    return Member(cfg, ExperimentDir(Path(models_dir) / cfg.name, cfg.final_size))


def out_dir(members: list[Member], models_dir: Path, name: str) -> ExperimentDir:
    """The ensemble's folder ``models_dir/name``, at the largest member's size (where ``blend`` puts every map)."""
    return ExperimentDir(Path(models_dir) / name, max(m.cfg.final_size for m in members))
