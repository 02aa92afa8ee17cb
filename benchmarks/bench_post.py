"""bench-post: exact grid search vs brute force; inference with/without TTA; peak memory vs image count."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, write_prepare_record  # noqa: E402

from pneumothorax.data import folds, synthetic
from pneumothorax.io import atomic, config, rle
from pneumothorax.io.paths import ExperimentDir
from pneumothorax.models import factory, tta
from pneumothorax.post import exact_search
from pneumothorax.post.postprocess import PostProcess
from pneumothorax.train import checkpoints


def bench_grid(n: int = 2000, size: int = 256, sample: int = 10) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        probs = np.lib.format.open_memmap(Path(tmp) / "p.npy", "w+", np.uint8, (n, size, size))
        masks = np.lib.format.open_memmap(Path(tmp) / "m.npy", "w+", np.bool_, (n, size, size))
        for i in range(0, n, 100):
            base = rng.random((100, size, size))
            masks[i : i + 100] = base < 0.03
            probs[i : i + 100] = (np.clip(base * 1.3, 0, 1) ** 3 * 255).astype(np.uint8)
        probs.flush()
        masks.flush()
        probs = np.load(Path(tmp) / "p.npy", mmap_mode="r")
        masks = np.load(Path(tmp) / "m.npy", mmap_mode="r")
        b_th = config.Grid(0.2, 0.9, 0.001).values()
        r_th = [0, 512, 1024, 2048, 3072, 4096, 6144, 8192]
        exact_search.grid_search(probs[:4], masks[:4], b_th, r_th)  # numba cache
        read_s, _ = _time(lambda: (np.asarray(probs).sum(), np.asarray(masks).sum()))
        fast_s, grid = _time(lambda: exact_search.grid_search(probs, masks, b_th, r_th))
        sub_fast = exact_search.grid_search(probs[:sample], masks[:sample], b_th, r_th)
        brute_s, sub_brute = _time(
            lambda: exact_search.grid_search_brute(np.asarray(probs[:sample]), np.asarray(masks[:sample]), b_th, r_th)
        )
    brute_full = brute_s * n / sample
    return {
        "maps": n,
        "size": size,
        "b_th": len(b_th),
        "r_th": len(r_th),
        "grid_search_seconds": round(fast_s, 3),
        "read_maps_once_seconds": round(read_s, 3),
        "brute_force_seconds_on_sample": round(brute_s, 2),
        "sample": sample,
        "brute_force_seconds_extrapolated": round(brute_full, 1),
        "speedup": round(brute_full / fast_s),
        "identical_on_sample": bool(np.abs(sub_fast - sub_brute).max() < 1e-12),
        "max_abs_difference": float(np.abs(sub_fast - sub_brute).max()),
        "targets": "< 1 s on 2 cores; >= 2000x brute force; identical",
    }


def _time(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_tta(size: int = 256, batch: int = 8, steps: int = 4) -> dict:
    cfg = config.load("2st_exp5")
    model = factory.create_segmenter(replace(cfg.segmentation, encoder_weights="none"), 3).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(steps):
            torch.sigmoid(model(x))
        single = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            tta.predict_batch([model], x, [])
        no_tta = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            tta.predict_batch([model], x, ["hflip"])
        flipped = time.perf_counter() - start
    n = batch * steps
    return {
        "size": size,
        "forward_alone_images_per_s": round(n / single, 2),
        "infer_no_tta_images_per_s": round(n / no_tta, 2),
        "infer_hflip_tta_images_per_s": round(n / flipped, 2),
        "tta_time_over_single_pass": round(flipped / single, 3),
        "target": "TTA path <= 2.2x the single pass",
    }


def bench_memory() -> dict:
    out = {}
    for n in (500, 2000):
        result = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "memory_probe.py"), str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[n] = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "images_500": out[500],
        "images_2000": out[2000],
        "peak_rss_ratio_2000_over_500": round(out[2000]["peak_rss_mb"] / out[500]["peak_rss_mb"], 3),
        "after_infer_ratio_2000_over_500": round(out[2000]["peak_after_infer_mb"] / out[500]["peak_after_infer_mb"], 3),
        "target": "flat (ratio close to 1) after inference; the submission adds the RLE text it writes",
    }


def fake_world(root: Path, n_train: int = 2000, n_new: int = 500, size: int = 256) -> Path:
    """A processed folder, three experiments with finished folds (OOF and test maps), and n_new new DICOMs."""
    rng = np.random.default_rng(0)
    cfg = config.load(
        "tiny",
        [
            "data.sizes=[128, 256]",
            "segmentation.stages.0.size=128",
            f"segmentation.stages.1.size={size}",
            "classifier.enabled=false",
        ],
    )
    processed = root / "processed"
    processed.mkdir(parents=True)
    train_ids = [f"r{i}" for i in range(n_train)]
    test_ids = [f"t{i}" for i in range(n_new)]
    positive = rng.random(n_train) < 0.25
    meta = pd.concat(
        [
            pd.DataFrame(
                {
                    "image_id": train_ids,
                    "split": "train",
                    "index": np.arange(n_train),
                    "error": "",
                    "has_pneumothorax": positive.astype(int),
                    "patient": train_ids,
                }
            ),
            pd.DataFrame(
                {
                    "image_id": test_ids,
                    "split": "test",
                    "index": np.arange(n_new),
                    "error": "",
                    "has_pneumothorax": 0,
                    "patient": test_ids,
                }
            ),
        ]
    )
    atomic.write_csv(processed / "metadata.csv", meta)
    masks = np.lib.format.open_memmap(processed / f"masks_train_{size}.npy", "w+", np.uint8, (n_train, size, size))
    rows = []
    for i in range(n_train):
        if positive[i]:
            y, x = rng.integers(20, size - 60, 2)
            masks[i, y : y + 40, x : x + 30] = 1
            rows.append(
                (train_ids[i], rle.encode(cv2.resize(masks[i], (1024, 1024), interpolation=cv2.INTER_NEAREST) > 0))
            )
        else:
            rows.append((train_ids[i], "-1"))
    masks.flush()
    atomic.write_csv(root / "labels.csv", pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"]))
    np.save(processed / f"images_test_{size}.npy", rng.integers(0, 255, (n_new, size, size), dtype=np.uint8))
    write_prepare_record(processed, test_ids, root / "labels.csv")
    split = pd.DataFrame({"image_id": train_ids, "fold": np.arange(n_train) % cfg.data.n_folds})
    model = factory.create_segmenter(replace(cfg.segmentation, encoder_weights="none"), cfg.data.channels)
    for m in range(3):
        _fake_member(root / "models" / f"m{m}", cfg, split, masks, model, rng, n_new, test_ids, size)
    new = root / "new"
    for i in range(n_new):
        pixels = rng.integers(0, 255, (1024, 1024), dtype=np.uint8)
        synthetic.write_dicom(new / f"n{i}.dcm", pixels, {"SOPInstanceUID": f"1.2.3.{i}", "PatientID": "x"})
    atomic.write_json(root / "world.json", {"n_train": n_train, "n_new": n_new, "size": size})
    return root


def _fake_member(root, cfg, split, masks, model, rng, n_new, test_ids, size) -> None:
    exp = ExperimentDir(root, size)
    root.mkdir(parents=True)
    atomic.write_csv(exp.folds, split)
    exp.oof.mkdir()
    for k in range(cfg.data.n_folds):
        run = exp.segmenter(k)
        run.root.mkdir()
        run.config.write_text(config.dump(cfg))
        part = split[split["fold"] == k]
        rows = part.index.to_numpy()
        atomic.write_csv(
            exp.oof_ids(k), pd.DataFrame({"image_id": part["image_id"], "index": rows, "has_pneumothorax": 0})
        )
        noise = rng.integers(0, 90, (len(rows), size, size), dtype=np.uint8)
        np.save(exp.oof_maps(k), np.asarray(masks[rows]) * 160 + noise)
        checkpoints.save_checkpoint(run.weights("last"), model.state_dict())
        meta = {"section": {"split": folds.split_hash(split, k)}}
        checkpoints.save_checkpoint(run.model, {"state_dict": model.state_dict(), "meta": meta})
        atomic.write_json(run.trained_under, meta["section"])
    exp.test.mkdir()
    np.save(exp.test_maps, rng.integers(0, 255, (n_new, size, size), dtype=np.uint8))
    atomic.write_csv(exp.test_ids, pd.DataFrame({"image_id": test_ids, "row": np.arange(n_new), "error": ""}))
    atomic.write_csv(exp.test_gate, pd.DataFrame({"image_id": test_ids, "prob": 1.0}))
    exp.postprocess.write_text(json.dumps({"postprocess": PostProcess().to_dict(), "score_full_resolution": 0.0}))


def _probe(step: str, root: Path) -> dict:
    script = str(Path(__file__).parent / "ensemble_probe.py")
    result = subprocess.run([sys.executable, script, step, str(root)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_ensemble_and_predict() -> dict:
    """Peak memory and time of an ensemble of 3 experiments x 2,000 OOF maps against one experiment's search;
    prediction on 500 new DICOMs against inference on the same number of prepared images."""
    with tempfile.TemporaryDirectory() as tmp:
        root = fake_world(Path(tmp))
        one, three = _probe("search", root), _probe("ensemble", root)
        new, prepared = _probe("predict", root), _probe("infer", root)
    return {
        "search_one_experiment": one,
        "ensemble_three_experiments": three,
        "ensemble_peak_over_one": round(three["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "ensemble_target": "peak memory <= 1.2x one experiment's search",
        "predict_new_dicoms": {**new, "images_per_s": round(new["images"] / new["seconds"], 2)},
        "infer_prepared": {**prepared, "images_per_s": round(prepared["images"] / prepared["seconds"], 2)},
        "predict_over_infer_rate": round(
            (new["images"] / new["seconds"]) / (prepared["images"] / prepared["seconds"]), 3
        ),
        "note": "2 folds of a tiny segmenter at 256 px, hflip TTA, on CPU; predict also decodes 1024 DICOMs and writes "
        "masks and overlays",
    }


if __name__ == "__main__":
    save(
        "bench_post",
        {
            "grid_search": bench_grid(),
            "tta": bench_tta(),
            "memory": bench_memory(),
            "ensemble_and_predict": bench_ensemble_and_predict(),
        },
    )
