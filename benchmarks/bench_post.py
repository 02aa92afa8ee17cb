"""bench-post: exact grid search vs brute force; inference with/without TTA; peak memory vs image count."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from pneumothorax import config, models, thresholds, tta  # noqa: E402


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
        thresholds.grid_search(probs[:4], masks[:4], b_th, r_th)  # numba cache
        read_s, _ = _time(lambda: (np.asarray(probs).sum(), np.asarray(masks).sum()))
        fast_s, grid = _time(lambda: thresholds.grid_search(probs, masks, b_th, r_th))
        sub_fast = thresholds.grid_search(probs[:sample], masks[:sample], b_th, r_th)
        brute_s, sub_brute = _time(
            lambda: thresholds.grid_search_brute(np.asarray(probs[:sample]), np.asarray(masks[:sample]), b_th, r_th)
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
    model = models.create_segmenter(replace(cfg.segmentation, encoder_weights="none"), 3).eval()
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
        "target": "flat (ratio close to 1)",
    }


if __name__ == "__main__":
    save("bench_post", {"grid_search": bench_grid(), "tta": bench_tta(), "memory": bench_memory()})
