"""bench-train: what a user needs to know before a GPU run, from the recipes' own configs.

- the loader: augmented images/s with real worker processes at every stage's size and augmentation
  groups, against the number of workers;
- the model step: images/s at every stage's size and batch, in fp32, AMP bf16 and bf16 +
  channels_last (and torch.compile), with peak GPU memory;
- epoch time (a fold of the real data: 9,637 training images) and the time of one whole 2ST Exp5
  fold, predicted from the slower of the two.

On CPU it runs the same code at batch 2 and says that the GPU figures need CUDA.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import prepared_world, save  # noqa: E402

from pneumothorax import config, data, devices, losses, models  # noqa: E402

RECIPES = ("2st_exp5", "1st_place")
FOLD_IMAGES = 12047 * 4 // 5  # training images of one fold of the real data


def loader_rate(processed, size: int, augment: tuple[str, ...], batch: int, workers: int, batches: int) -> float:
    """Augmented images/s delivered by a DataLoader with ``workers`` processes (after its first batch)."""
    rows = data.train_rows(processed, processed / "folds.csv")  # the benchmark world keeps its split there
    ds = data.CacheDataset(
        processed, "train", size, rows["index"].to_numpy(), data.segmentation_augment(augment, size, 0.5)
    )
    sampler = data.PositiveRateSampler(rows["has_pneumothorax"].to_numpy(), seed=0)
    loader = data.make_loader(ds, batch, sampler, workers, drop_last=True)
    done, start, epoch = 0, None, 0
    while done < batches:
        sampler.set_epoch(epoch)
        for _ in loader:
            if start is None:  # the first batch pays for starting the workers
                start, done = time.perf_counter(), -1
            done += 1
            if done >= batches:
                break
        epoch += 1
    return batches * batch / (time.perf_counter() - start)


def step_rate(cfg, size: int, batch: int, device, amp: str, channels_last: bool, steps: int, compile_: bool = False):
    """(images/s, peak GPU GiB or None) of training steps of the recipe's model, loss and optimiser."""
    seg = replace(cfg.segmentation, encoder_weights="none")
    model = models.create_segmenter(seg, cfg.data.channels).to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = devices.compiled(model, compile_)
    opt, loss_fn = torch.optim.Adam(model.parameters(), 1e-3), losses.ComboLoss(seg.loss)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    masks = (torch.rand(batch, 1, size, size) > 0.9).to(torch.uint8)

    def step() -> None:
        x = data.model_input(images, cfg.data.channels, device, channels_last)
        with devices.autocast(device, amp):
            out = net(x)
        loss = loss_fn(out.float(), data.model_target(masks, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: cuDNN autotuning, compilation
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return batch * steps / (time.perf_counter() - start), peak


def stage_figures(cfg, stage, processed, device, workers_list) -> dict:
    """Loader and step figures of one recipe stage, and its epoch time."""
    batch = stage.batch_size if device.type == "cuda" else 2
    steps = 20 if device.type == "cuda" else 2
    batches = 10 if device.type == "cuda" else 40
    loader = {w: round(loader_rate(processed, stage.size, stage.augment, batch, w, batches), 1) for w in workers_list}
    out = {"size": stage.size, "batch": batch, "augment": list(stage.augment), "loader_images_per_s_by_workers": loader}
    variants = {"fp32": ("none", False)}
    if device.type == "cuda":
        variants |= {"bf16": ("bf16", False), "bf16_channels_last": ("bf16", True)}
    for name, (amp, channels_last) in variants.items():
        rate, peak = step_rate(cfg, stage.size, batch, device, amp, channels_last, steps)
        out[f"step_{name}_images_per_s"] = round(rate, 2)
        if peak is not None:
            out[f"peak_gib_{name}"] = round(peak, 2)
    best_step = max(v for k, v in out.items() if k.startswith("step_"))
    out["epoch_minutes"] = round(FOLD_IMAGES / min(best_step, max(loader.values())) / 60, 2)
    return out


def main() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0))
    workers_list = sorted({0, 1, 2, min(4, cores), min(8, cores)})
    results: dict = {
        "device": devices.describe_device(device),
        "fold_images": FOLD_IMAGES,
        "note": None if device.type == "cuda" else "CPU figures at batch 2; the GPU figures need CUDA",
    }
    with tempfile.TemporaryDirectory() as tmp:
        _, processed = prepared_world(Path(tmp), 96, 0, (256, 512, 1024))
        for name in RECIPES:
            cfg = config.load(name)
            stages = [stage_figures(cfg, stage, processed, device, workers_list) for stage in cfg.segmentation.stages]
            fold_hours = sum(
                s["epoch_minutes"] * st.epochs for s, st in zip(stages, cfg.segmentation.stages, strict=True)
            )
            results[name] = {"stages": stages, "fold_hours_predicted": round(fold_hours / 60, 2)}
        cfg, first = config.load("2st_exp5"), config.load("2st_exp5").segmentation.stages[0]
        size, batch = (first.size, first.batch_size) if device.type == "cuda" else (128, 2)
        amp, channels_last = ("bf16", True) if device.type == "cuda" else ("none", False)
        eager, _ = step_rate(cfg, size, batch, device, amp, channels_last, 10 if device.type == "cuda" else 2)
        compiled, _ = step_rate(cfg, size, batch, device, amp, channels_last, 10 if device.type == "cuda" else 2, True)
        results["compile"] = {
            "size": size,
            "batch": batch,
            "eager_images_per_s": round(eager, 2),
            "compiled_images_per_s": round(compiled, 2),
            "speedup": round(compiled / eager, 3),
        }
    results["ddp_scaling"] = "needs several GPUs" if torch.cuda.device_count() < 2 else "run make train NPROC=N"
    return results


if __name__ == "__main__":
    save("bench_train", main())
