"""bench-train: training images/s (model step alone, with the real loader) and loader images/s per worker."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import prepared_world, save  # noqa: E402

from pneumothorax import config, data, engine, losses, models  # noqa: E402


def _model_and_opt(cfg, device):
    model = models.create_segmenter(replace(cfg.segmentation, encoder_weights="none"), cfg.data.channels).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), 1e-3), losses.ComboLoss(cfg.segmentation.loss)


def _step(model, opt, loss_fn, x, y, amp, device):
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with engine.autocast(device, amp):
        out = model(x)
    loss = loss_fn(out.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def model_step_rate(cfg, size, batch, steps, device, amp="none") -> float:
    model, opt, loss_fn = _model_and_opt(cfg, device)
    x = torch.randn(batch, cfg.data.channels, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.9).float()
    _step(model, opt, loss_fn, x, y, amp, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        _step(model, opt, loss_fn, x, y, amp, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def loader_step_rate(cfg, processed, size, batch, steps, device, workers) -> float:
    model, opt, loss_fn = _model_and_opt(cfg, device)
    rows = data.train_rows(processed)
    ds = data.CacheDataset(
        processed,
        "train",
        size,
        rows["index"].to_numpy(),
        data.segmentation_augment(["A1", "A2", "A3", "A4"], size, 0.5),
    )
    sampler = data.PositiveRateSampler(rows["has_pneumothorax"].to_numpy(), seed=0)  # keys: augmented samples
    loader = data.make_loader(ds, batch, sampler, workers, drop_last=True)
    channels = cfg.data.channels

    def step(images, masks):
        _step(
            model,
            opt,
            loss_fn,
            data.model_input(images, channels, device),
            data.model_target(masks, device),
            "none",
            device,
        )

    it = iter(loader)
    step(*next(it))
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        step(x, y)
        n += len(x)
    return n / (time.perf_counter() - start)


def loader_alone_rate(cfg, processed, size, n) -> float:
    rows = data.train_rows(processed)
    ds = data.CacheDataset(
        processed,
        "train",
        size,
        rows["index"].to_numpy(),
        data.segmentation_augment(["A1", "A2", "A3", "A4"], size, 0.5),
    )
    ds[(0, (0, 0, 0))]
    start = time.perf_counter()
    for i in range(n):
        ds[(i % len(ds), (0, 0, i))]  # a sampler key: the sample is augmented
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    cfg = config.load("2st_exp5")  # U-Net ResNet34, 3 channels
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        _, processed = prepared_world(Path(tmp), 120, 0, (256, 512))
        results = {
            "device": str(device),
            "model": "U-Net ResNet34 (2st_exp5), 3 channels, BCE + Dice, Adam",
            "step_alone_256_images_per_s": round(model_step_rate(cfg, 256, 8, 4, device), 2),
            "step_with_loader_A1_A4_256_images_per_s": round(loader_step_rate(cfg, processed, 256, 8, 4, device, 2), 2),
            "loader_alone_512_A1_A4_images_per_s_per_worker": round(loader_alone_rate(cfg, processed, 512, 200), 1),
            "loader_target": "8 workers x per-worker rate >= 1000 images/s (a GPU step at 512)",
        }
        results["loader_8_workers_images_per_s"] = round(8 * results["loader_alone_512_A1_A4_images_per_s_per_worker"])
        if device.type == "cuda":
            results["gpu_512_amp_bf16_channels_last_images_per_s"] = round(
                model_step_rate(cfg, 512, 32, 20, device, "bf16"), 1
            )
            results["gpu_1024_batch4_amp_bf16_images_per_s"] = round(
                model_step_rate(cfg, 1024, 4, 20, device, "bf16"), 1
            )
    save("bench_train", results)
