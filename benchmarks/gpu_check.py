"""make gpu-check: every risky path of the CUDA code, exercised on a small synthetic world, each PASS, FAIL or SKIP.

Run it first on a GPU box and paste its output into an issue. On one GPU it takes a few minutes (the
world is 96 images; models train an epoch or two at 64-128 px), then runs ``make bench-train``. On a
CPU it runs every path that needs no CUDA and names the ones it skipped. Exit status: 1 if any check
failed. ``python benchmarks/gpu_check.py [--only NAME ...] [--no-bench]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import prepared_world  # noqa: E402

from pneumothorax.data import augmentations, datasets  # noqa: E402
from pneumothorax.io import config, paths  # noqa: E402
from pneumothorax.io.paths import ExperimentDir  # noqa: E402
from pneumothorax.models import devices, trained, tta  # noqa: E402
from pneumothorax.train import checkpoints, classifier, segmentation  # noqa: E402
from pneumothorax.train.trainer import Interrupted  # noqa: E402

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count()
TINY = ["data.sizes=[64,128]", "data.n_folds=5", "classifier.size=64", "infer.batch_size=8"]
STAGES = (
    "segmentation.stages=[{size: 64, epochs: 2, batch_size: 8, lr: 0.002, swa_epochs: 1, accumulate: 2, "
    "positive_rate: 0.5, augment: [A1, A2]}, {size: 128, epochs: 2, batch_size: 8, lr: 0.001, swa_epochs: 1, "
    "augment: [A1, A3]}]"
)


class Skip(Exception):
    """A check that needs what this machine lacks."""


def _need_cuda(gpus: int = 1) -> None:
    if gpus > GPUS:
        raise Skip(f"needs {gpus} CUDA GPU(s); this machine has {GPUS}")


def _device() -> str:
    return "cuda" if CUDA else "cpu"


def _fresh(root: Path, name: str, processed: Path) -> ExperimentDir:
    exp = ExperimentDir(root / "models" / name, 128)
    exp.root.mkdir(parents=True, exist_ok=True)
    (exp.root / "folds.csv").write_bytes((processed / "folds.csv").read_bytes())
    return exp


def check_full_precision_path(root: Path, processed: Path) -> str:
    """bf16 + channels_last + SWA + EMA + top-k + accumulation + persistent pinned workers: one fold, two stages."""
    amp = ["segmentation.amp=bf16", "segmentation.channels_last=true"] if CUDA else []
    cfg = config.load(
        "tiny",
        [*TINY, STAGES, *amp, "segmentation.ema_decay=0.9", "segmentation.top_k=2", "data.workers=2"],
    )
    exp = _fresh(root, "full", processed)
    segmentation.train_fold(cfg, 0, processed, exp, device=_device(), progress=False)
    run = exp.segmenter(0)
    made = [w for w in ("swa", "ema", "topk") if run.weights(w).exists()]
    losses = pd.read_csv(run.metrics)["train_loss"].dropna()
    assert made == ["swa", "ema", "topk"] and len(losses) == 4 and np.isfinite(losses).all(), made
    return f"{'bf16 + channels_last' if CUDA else 'fp32 (CPU)'}; weights {', '.join(made)} written"


def _weights(run) -> dict[str, torch.Tensor]:
    return checkpoints.load_checkpoint(run.model)["state_dict"]


def check_fp16_killed_and_resumed(root: Path, processed: Path) -> str:
    """fp16 with its GradScaler: a run killed after an epoch and resumed ends where an unbroken run does."""
    _need_cuda()
    cfg = config.load("tiny", [*TINY, STAGES, "segmentation.amp=fp16", "deterministic=true"])
    whole, parts = _fresh(root, "fp16-whole", processed), _fresh(root, "fp16-parts", processed)
    segmentation.train_fold(cfg, 0, processed, whole, device="cuda", progress=False)
    with contextlib.suppress(Interrupted):
        segmentation.train_fold(cfg, 0, processed, parts, device="cuda", progress=False, max_epochs=1)
    segmentation.train_fold(cfg, 0, processed, parts, device="cuda", progress=False)
    a, b = _weights(whole.segmenter(0)), _weights(parts.segmenter(0))
    gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert gap < 1e-3, gap
    return f"max weight difference whole vs resumed {gap:.2e}"


def check_cpu_run_resumed_on_gpu(root: Path, processed: Path) -> str:
    """A run started on the CPU (scaler disabled) resumes on the GPU with fp16."""
    _need_cuda()
    cfg = config.load("tiny", [*TINY, STAGES, "segmentation.amp=fp16"])
    exp = _fresh(root, "cpu-then-gpu", processed)
    with contextlib.suppress(Interrupted):
        segmentation.train_fold(cfg, 0, processed, exp, device="cpu", progress=False, max_epochs=1)
    segmentation.train_fold(cfg, 0, processed, exp, device="cuda", progress=False)
    assert exp.segmenter(0).model.exists()
    return "resumed and finished"


def check_classifier(root: Path, processed: Path) -> str:
    """The gate: a classifier fold (bf16 + channels_last on CUDA), its validation gathered."""
    amp = ["classifier.amp=bf16", "classifier.channels_last=true"] if CUDA else ["classifier.amp=none"]
    cfg = config.load("tiny", [*TINY, "classifier.epochs=2", "classifier.batch_size=16", *amp])
    exp = _fresh(root, "gate", processed)
    summary = classifier.train_classifier_fold(cfg, 0, processed, exp, device=_device(), progress=False)
    assert 0 <= summary["auc"] <= 1, summary
    return f"AUC {summary['auc']:.3f} after 2 epochs"


def check_augmentation_with_workers(root: Path, processed: Path) -> str:
    """Each sample's augmentation is the same with 0 and 4 loader workers."""
    rows = datasets.train_rows(processed, processed / "folds.csv")
    transform = augmentations.segmentation_augment(["A1", "A2", "A3", "A4"], 128, 0.9)
    dataset = datasets.CacheDataset(processed, "train", 128, rows["index"].to_numpy()[:32], transform)
    batches = {}
    for workers in (0, 4):
        sampler = datasets.PositiveRateSampler(np.zeros(32, dtype=int), seed=3)
        batches[workers] = torch.cat([x for x, _ in datasets.make_loader(dataset, 8, sampler, workers)])
    assert torch.equal(batches[0], batches[4])
    return "32 augmented images identical"


DDP_SCRIPT = """
# One rank of a real DDP group (the backend the pipeline uses): no_sync() on half a batch, then a synced half,
# must equal plain accumulation; SyncBN layers must survive the SWA and EMA copies. The pipeline itself never wraps
# a lone rank (devices.wrap_ddp returns the bare model, asserted below), so the group is made here.
import sys, torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from pneumothorax.models import devices
from pneumothorax.train.ema import Ema
dev = torch.device(sys.argv[1])
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1)).to(dev)
with devices.running(dev.type) as runtime:
    assert devices.wrap_ddp(net(), runtime, sync_bn=True).__class__ is nn.Sequential, "one rank is run without DDP"
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo")
    ids = [dev.index or 0] if dev.type == "cuda" else None
    sync = devices.sync_batchnorm if dev.type == "cuda" else (lambda m: m)  # DDP takes SyncBN on GPU modules only
    ddp = DistributedDataParallel(sync(net()), device_ids=ids)
    AveragedModel(ddp.module); Ema(ddp.module, 0.9)  # SWA and EMA copies of SyncBN layers
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 16, 16, device=dev), torch.rand(8, 1, 16, 16, device=dev)
    with ddp.no_sync():
        nn.functional.mse_loss(ddp(x[:4]), y[:4]).backward()
    nn.functional.mse_loss(ddp(x[4:]), y[4:]).backward()
    plain = net()
    for half in (slice(0, 4), slice(4, 8)):
        nn.functional.mse_loss(plain(x[half]), y[half]).backward()
    gap = max(float((g.grad - h.grad).abs().max()) for g, h in zip(ddp.module.parameters(), plain.parameters()))
    dist.destroy_process_group()
    print("GAP", gap, flush=True)
"""


def _torchrun(nproc: int, script: str, root: Path, *args: str) -> str:
    path = root / "ddp.py"
    path.write_text(script)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run(
        [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def check_ddp_one_rank(root: Path, processed: Path) -> str:
    """One-rank cpu:gloo,cuda:nccl DDP: no_sync then a synced batch equals plain accumulation; SyncBN copies."""
    _need_cuda()
    gap = float(_torchrun(1, DDP_SCRIPT, root, "cuda").split("GAP")[-1])
    assert gap < 1e-5, gap
    return f"gradient gap {gap:.1e}"


def check_ddp_two_ranks(root: Path, processed: Path) -> str:
    """Two ranks: a segmentation fold with sync_bn, SWA statistics on equal shards (an uneven split)."""
    _need_cuda(2)
    cfg_args = ["--set", "segmentation.sync_bn=true", "--set", "segmentation.swa_bn_images=37"]
    exp = _fresh(root, "ddp2", processed)
    script = paths.ROOT / "scripts" / "04_train_segmentation.py"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    overrides = sum((["--set", o] for o in [*TINY, STAGES]), [])
    done = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            "--config",
            "tiny",
            *overrides,
            *cfg_args,
            "--fold",
            "0",
            "--processed",
            str(processed),
            "--exp-dir",
            str(exp.root),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and exp.segmenter(0).model.exists(), done.stderr[-2000:]
    return "trained over 2 GPUs"


def check_compile_two_sizes(root: Path, processed: Path) -> str:
    """torch.compile over two stage sizes (a static graph per size)."""
    _need_cuda()
    cfg = config.load("tiny", [*TINY, STAGES, "compile=true", "segmentation.amp=bf16"])
    exp = _fresh(root, "compiled", processed)
    started = time.time()
    segmentation.train_fold(cfg, 0, processed, exp, device="cuda", progress=False)
    return f"two stages compiled and trained in {time.time() - started:.0f} s"


def check_gpu_maps_match_cpu(root: Path, processed: Path) -> str:
    """A fold's OOF maps from the GPU in bf16 against the CPU in fp32: max absolute difference in p."""
    _need_cuda()
    exp = root / "models" / "full"
    if not (exp / "fold0" / "model.pt").exists():
        raise Skip("needs check_full_precision_path's fold")
    cfg = config.load("tiny", [*TINY, STAGES, "segmentation.amp=bf16", "segmentation.channels_last=true"])
    rows = datasets.train_rows(processed, processed / "folds.csv")
    dataset = datasets.CacheDataset(processed, "train", 128, rows[rows["fold"] == 0]["index"].to_numpy())
    maps = {}
    for device, amp in (("cpu", "none"), ("cuda", "bf16")):
        model = trained.load_segmenter(cfg, ExperimentDir(exp, 128).segmenter(0), "model", torch.device(device))
        out = root / f"maps-{device}.npy"
        tta.predict_to_file([model], dataset, out, ("hflip",), torch.device(device), 1, 8, amp, device == "cuda")
        maps[device] = np.load(out).astype(np.int16)
    gap = int(np.abs(maps["cpu"] - maps["cuda"]).max())
    assert gap <= 13, gap  # bf16 keeps 8 bits of mantissa: a few percent of p at most
    return f"max |p_gpu - p_cpu| = {gap}/255"


def check_inference_memory_is_flat(root: Path, processed: Path) -> str:
    """Peak GPU memory over 10 batches of inference equals that after the first: nothing accumulates."""
    _need_cuda()
    cfg = config.load("tiny", [*TINY, STAGES])
    model = trained.load_segmenter(
        cfg, ExperimentDir(root / "models" / "full", 128).segmenter(0), "model", torch.device("cuda")
    )
    x = torch.zeros(8, 1, 128, 128, device="cuda")
    peaks = []
    for _ in range(10):
        tta.predict_batch([model], x, ("hflip",), "bf16")
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[-1] == peaks[0], peaks
    return f"peak {peaks[0] / 2**20:.0f} MiB, flat"


def check_gpu_pool(root: Path, processed: Path) -> str:
    """The pool: jobs queue on fake GPUs, the job holds its own lock, ids follow an outer CUDA_VISIBLE_DEVICES."""
    tests = paths.ROOT / "tests" / "test_scaling.py"
    chosen = "queue or training_process or outer or shared"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tests), "-k", chosen, "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    return done.stdout.strip().splitlines()[-1]


CHECKS: list[Callable[[Path, Path], str]] = [
    check_full_precision_path,
    check_fp16_killed_and_resumed,
    check_cpu_run_resumed_on_gpu,
    check_classifier,
    check_augmentation_with_workers,
    check_ddp_one_rank,
    check_ddp_two_ranks,
    check_compile_two_sizes,
    check_gpu_maps_match_cpu,
    check_inference_memory_is_flat,
    check_gpu_pool,
]


def run(only: list[str], bench: bool) -> int:
    print(f"gpu-check on {devices.describe_device(torch.device(_device()))}; {GPUS} CUDA GPU(s)", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _, processed = prepared_world(Path(tmp), 96, 0, (64, 128))
        for check in CHECKS:
            name = check.__name__.removeprefix("check_")
            if only and name not in only:
                continue
            started = time.time()
            try:
                verdict, detail = "PASS", check(Path(tmp), processed)
            except Skip as why:
                verdict, detail = "SKIP", str(why)
            except Exception as exc:  # a failed check is a line of the report, not the end of the run
                verdict, detail = "FAIL", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            results.append(
                {"check": name, "verdict": verdict, "detail": detail, "seconds": round(time.time() - started, 1)}
            )
            print(f"{verdict} {name} ({results[-1]['seconds']} s): {detail}", flush=True)
    if bench:
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_train.py")], timeout=1800)
        results.append({"check": "bench_train", "verdict": "PASS" if done.returncode == 0 else "FAIL"})
        print(f"{results[-1]['verdict']} bench_train (benchmarks/results/bench_train.json)")
    print(json.dumps({r["verdict"]: sum(x["verdict"] == r["verdict"] for x in results) for r in results}))
    return 1 if any(r["verdict"] == "FAIL" for r in results) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=[], help="run these checks only (names without check_)")
    p.add_argument("--no-bench", action="store_true", help="skip bench-train at the end")
    args = p.parse_args()
    return run(args.only, not args.no_bench)


if __name__ == "__main__":
    sys.exit(main())
