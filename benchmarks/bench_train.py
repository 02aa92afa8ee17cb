"""bench-train: what a user needs to know before a GPU run, from the recipes' own configs.

- the loader: augmented images/s with real worker processes at every stage's size and augmentation
  groups, against the number of workers, in steady state (one long epoch, after each worker's first batch);
- the model step: images/s at every stage's size and batch, in fp32, AMP bf16 and bf16 +
  channels_last (and torch.compile), cuDNN benchmark on as in training, with peak GPU memory
  allocated and reserved;
- each stage's time on a fold of the real data (9,637 training images; with a positive sampler, its
  epochs' own sizes) and the time of one whole fold, predicted from the slower of loader and step.

On CPU it runs the same code at batch 2 and says that the GPU figures need CUDA. On every device it also
times ``real_cpu``'s gate and U-Net steps at their own sizes and batches, contiguous against channels_last,
and on CPU channels_last in fp32 against bf16 autocast (``cpu_bf16``), and what two such trainings at once, on
half the cores each, do against one on all of them (``bench-real``'s ``JOBS=2``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import prepared_world, save  # noqa: E402

from pneumothorax.data import augmentations, datasets
from pneumothorax.io import config
from pneumothorax.models import devices, factory, losses

RECIPES = ("2st_exp5", "1st_place")
FOLD_IMAGES = 12047 * 4 // 5  # training images of one fold of the real data
POSITIVE_SHARE = 2669 / 12047  # images with pneumothorax in stage_2_train.csv


def loader_rate(processed, size: int, augment: tuple[str, ...], batch: int, workers: int, batches: int) -> float:
    """Augmented images/s a DataLoader with ``workers`` processes keeps up, in steady state: one long epoch over the
    benchmark world's rows repeated (so every worker stays busy), timed after each worker delivered its first batch."""
    rows = datasets.train_rows(processed, processed / "folds.csv")  # the benchmark world keeps its split there
    warmup = max(1, workers)
    repeated = np.resize(rows["index"].to_numpy(), (batches + warmup) * batch)
    ds = datasets.CacheDataset(
        processed, "train", size, repeated, augmentations.segmentation_augment(augment, size, 0.5)
    )
    sampler = datasets.PositiveRateSampler(np.zeros(len(repeated), dtype=int), seed=0)  # every row once, shuffled
    loader = iter(datasets.make_loader(ds, batch, sampler, workers, drop_last=True))
    for _ in range(warmup):  # starting the workers and their first batches
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch / (time.perf_counter() - start)


def step_rate(
    cfg,
    size: int,
    batch: int,
    device,
    amp: str,
    channels_last: bool,
    steps: int,
    compile_: bool = False,
    cpu_bf16: bool = False,
):
    """(images/s, peak GPU GiB or None) of training steps of the recipe's model, loss and optimiser (``cpu_bf16``:
    under bf16 autocast on CPU, as ``segmentation.cpu_bf16`` trains)."""
    seg = replace(cfg.segmentation, encoder_weights="none")
    model = devices.in_memory_format(factory.create_segmenter(seg, cfg.data.channels).to(device), channels_last)
    net = devices.compiled(model, compile_)
    opt, loss_fn = torch.optim.Adam(model.parameters(), 1e-3), losses.ComboLoss(seg.loss)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    masks = (torch.rand(batch, 1, size, size) > 0.9).to(torch.uint8)

    def step() -> None:
        x = datasets.model_input(images, cfg.data.channels, device, channels_last)
        with devices.autocast(device, amp, cpu_bf16):
            out = net(x)
        loss = loss_fn(out.float(), datasets.model_target(masks, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.backends.cudnn.benchmark = True  # as training runs (checkpoints.seed_everything, deterministic: false)
    seconds = timed_steps(step, steps, device)
    peak = None
    if device.type == "cuda":  # what tensors held, and what the caching allocator reserved (what nvidia-smi shows)
        peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
    return batch * steps / seconds, peak


def timed_steps(step, steps: int, device) -> float:
    """Seconds of ``steps`` calls of ``step`` after two warm-up calls (cuDNN autotuning, compilation); the GPU's
    peak memory is counted from the timed calls on."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def classifier_step_rate(cfg, device, channels_last: bool, steps: int, cpu_bf16: bool = False) -> float:
    """Images/s of training steps of the recipe's gate (model, BCE, Adam) at its size and batch, in fp32 (in bf16
    on CPU with ``cpu_bf16``)."""
    model = factory.create_classifier(replace(cfg.classifier, pretrained="none"), cfg.data.channels).to(device)
    model = devices.in_memory_format(model, channels_last)
    opt, batch, size = torch.optim.Adam(model.parameters(), 1e-3), cfg.classifier.batch_size, cfg.classifier.size
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    labels = (torch.rand(batch, 1) > 0.5).float().to(device)

    def step() -> None:
        with devices.autocast(device, "none", cpu_bf16):
            out = model(datasets.model_input(images, cfg.data.channels, device, channels_last))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch * steps / timed_steps(step, steps, device)


def cpu_recipe_figures(name: str, device, steps: int) -> dict:
    """A CPU recipe's gate and U-Net training steps at its own sizes and batches: contiguous against channels_last
    (``classifier/segmentation.channels_last``, which training and inference honour on every device), and on CPU
    channels_last in fp32 against bf16 autocast (``cpu_bf16``): the ratios are what each saves in ``make
    bench-real``'s two training steps."""
    cfg = config.load(name)
    stage = cfg.segmentation.stages[0]
    out: dict = {"gate": {"size": cfg.classifier.size, "batch": cfg.classifier.batch_size}}
    out["unet"] = {"size": stage.size, "batch": stage.batch_size}
    variants = {"contiguous": (False, False), "channels_last": (True, False)}
    if device.type == "cpu":
        variants["channels_last_bf16"] = (True, True)
    for variant, (channels_last, bf16) in variants.items():
        for part in ("gate", "unet"):
            rate = recipe_step_rate(cfg, part, device, channels_last, bf16, steps)
            out[part][f"{variant}_images_per_s"] = round(rate, 2)
    for part in ("gate", "unet"):
        rate = {k.removesuffix("_images_per_s"): v for k, v in out[part].items() if k.endswith("_images_per_s")}
        out[part]["channels_last_speedup"] = round(rate["channels_last"] / rate["contiguous"], 3)
        if "channels_last_bf16" in rate:
            out[part]["bf16_speedup"] = round(rate["channels_last_bf16"] / rate["channels_last"], 3)
    return out


def epoch_images(stage, epoch: int) -> int:
    """Images of one epoch of a stage on a fold of the real data: the positive sampler takes every positive and
    only as many negatives as its rate asks (the 1st place's epochs are a fraction of the fold)."""
    if stage.positive_rate is None:
        return FOLD_IMAGES
    end = stage.positive_rate if stage.positive_rate_end is None else stage.positive_rate_end
    rate = stage.positive_rate + (end - stage.positive_rate) * (epoch / max(1, stage.epochs - 1))
    positives = round(FOLD_IMAGES * POSITIVE_SHARE)
    return positives + min(FOLD_IMAGES - positives, round(positives * (1 - rate) / rate))


def stage_figures(cfg, stage, processed, device, workers_list) -> dict:
    """Loader and step figures of one recipe stage, and its epoch time."""
    batch = stage.batch_size if device.type == "cuda" else 2
    steps = 20 if device.type == "cuda" else 2
    batches = 40 if device.type == "cuda" else 40
    loader = {w: round(loader_rate(processed, stage.size, stage.augment, batch, w, batches), 1) for w in workers_list}
    out = {"size": stage.size, "batch": batch, "augment": list(stage.augment), "loader_images_per_s_by_workers": loader}
    variants = {"fp32": ("none", False), "fp32_channels_last": ("none", True)}
    if device.type == "cuda":
        variants |= {"bf16": ("bf16", False), "bf16_channels_last": ("bf16", True)}
    for name, (amp, channels_last) in variants.items():
        rate, peak = step_rate(cfg, stage.size, batch, device, amp, channels_last, steps)
        out[f"step_{name}_images_per_s"] = round(rate, 2)
        if peak is not None:
            out[f"peak_allocated_gib_{name}"], out[f"peak_reserved_gib_{name}"] = (round(p, 2) for p in peak)
    best_step = max(v for k, v in out.items() if k.startswith("step_"))
    rate = min(best_step, max(loader.values()))
    images = [epoch_images(stage, e) for e in range(stage.epochs)]
    out["epoch_images"] = [min(images), max(images)]
    out["stage_minutes"] = round(sum(images) / rate / 60, 2)
    return out


def shared_cores_figures(name: str, steps: int) -> dict:
    """Images/s of ``name``'s bf16 gate and U-Net steps in one process on all the cores, against two processes at
    once on half the cores each (their sum): on a CPU, where one training does not use two cores fully, what
    ``make bench-real JOBS=2`` gains by training two members side by side."""
    cores = len(os.sched_getaffinity(0))
    out: dict = {"cores": cores}
    for part in ("gate", "unet"):
        one = _step_processes(name, part, steps, cores, 1)
        two = _step_processes(name, part, steps, cores // 2, 2)
        out[part] = {"one_job_images_per_s": one, "two_jobs_images_per_s": two, "speedup": round(two / one, 3)}
    return out


def _step_processes(name: str, part: str, steps: int, threads: int, jobs: int) -> float:
    """The summed images/s of ``jobs`` processes timing ``part``'s steps at once, each with ``threads`` threads."""
    command = [sys.executable, __file__, "--steps", name, part, str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(jobs)]
    printed = [p.communicate()[0] for p in running]
    if any(p.returncode for p in running):
        raise RuntimeError(f"{' '.join(command)} failed (exit {[p.returncode for p in running]})")
    return round(sum(json.loads(out.strip().splitlines()[-1]) for out in printed), 2)


def recipe_step_rate(cfg, part: str, device, channels_last: bool, bf16: bool, steps: int) -> float:
    """Images/s of a CPU recipe's gate (``part`` "gate") or U-Net ("unet", its first stage) training steps."""
    if part == "gate":
        return classifier_step_rate(cfg, device, channels_last, steps, bf16)
    stage = cfg.segmentation.stages[0]
    return step_rate(cfg, stage.size, stage.batch_size, device, "none", channels_last, steps, cpu_bf16=bf16)[0]


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
            fold_hours = sum(s["stage_minutes"] for s in stages) / 60
            results[name] = {"stages": stages, "fold_hours_predicted": round(fold_hours, 2)}
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
    results["real_cpu"] = cpu_recipe_figures("real_cpu", device, 20 if device.type == "cuda" else 12)
    if device.type == "cpu" and len(os.sched_getaffinity(0)) >= 2:
        results["real_cpu"]["shared_cores"] = shared_cores_figures("real_cpu", 24)
    results["ddp_scaling"] = "needs several GPUs" if torch.cuda.device_count() < 2 else "run make train NPROC=N"
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--steps"]:  # one process of shared_cores_figures: its images/s on the last line
        cpu = torch.device("cpu")
        print(json.dumps(recipe_step_rate(config.load(sys.argv[2]), sys.argv[3], cpu, True, True, int(sys.argv[4]))))
    else:
        save("bench_train", main())
