"""Segmentation and classifier training: learning, resuming, DDP (gloo, 2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from pneumothorax.data import prepared, splitting, synthetic
from pneumothorax.io import atomic, config, metric, paths
from pneumothorax.models import devices
from pneumothorax.post import exact_search
from pneumothorax.predict import oof
from pneumothorax.train import checkpoints, segmentation
from pneumothorax.train.trainer import Interrupted

TINY = ["data.sizes=[32, 64]", "data.n_folds=2"]
HARD_SIZE = 64
HARD_STAGE = (
    f"segmentation.stages=[{{size: {HARD_SIZE}, epochs: 40, batch_size: 8, lr: 0.002, positive_rate: 0.5, "
    "positive_rate_end: 0.25, augment: [A1], validate_every: 8}]"  # validation (5 of 40 epochs) picks nothing here
)


@pytest.mark.trains
def test_short_run_learns_and_beats_all_empty(processed, exp):
    cfg = config.load(
        "demo",
        [
            *TINY,
            "segmentation.stages=[{size: 64, epochs: 14, batch_size: 8, lr: 0.003, positive_rate: 0.5, "
            "positive_rate_end: 0.25, augment: [A1]}]",
        ],
    )
    out = exp.segmenter(0).root
    summary = segmentation.train_fold(cfg, 0, processed, exp, device="cpu", progress=False)
    assert summary["weights"] == "last"  # oof_weights swa, and the only stage has no SWA: its last weights
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 14
    assert metrics["train_loss"].iloc[-3:].mean() < metrics["train_loss"].iloc[:3].mean() * 0.8
    no_gate = replace(cfg, classifier=replace(cfg.classifier, enabled=False))  # this test trains no classifier
    predicted = oof.predict_oof(no_gate, exp, paths.ProcessedDir(processed), "cpu", progress=False, folds=[0])
    assert predicted["folds"][0]["weights"] == "last" and predicted["tta"] == ["hflip"]
    ids = pd.read_csv(exp.oof_ids(0), dtype={"image_id": str})
    maps = np.load(exp.oof_maps(0))
    assert maps.shape == (len(ids), 64, 64) and maps.dtype == np.uint8
    masks = prepared.load_cache(processed, "masks", "train", 64)[ids["index"].to_numpy()]
    folds = pd.read_csv(exp.folds, dtype={"image_id": str})
    assert sorted(ids["image_id"].astype(str)) == sorted(folds.loc[folds["fold"] == 0, "image_id"])  # held out only
    # What the pipeline uses is the searched B-TH/R-TH, not 0.5: a model this short is often
    # under-confident (every probability below 0.5 on one fold of this world) yet ranks pixels
    # well. Seen on worlds of seeds 11 and 14: searched 0.85-0.91 against all-empty 0.77-0.81.
    searched = exact_search.grid_search(maps, masks > 0, [t / 100 for t in range(5, 96, 5)], [0, 16, 32, 64])
    all_empty = float((masks.reshape(len(masks), -1).max(axis=1) == 0).mean())
    assert searched.max() > all_empty + 0.04
    for name in ("config.yaml", "best.pt", "last.pt", "model.pt", "train.log", "curves.png"):
        assert (out / name).exists(), name
    assert config.from_yaml((out / "config.yaml").read_text()) == cfg


def _hard_world(root, seed: int, prepare_world):
    """A tiny world of the generator's ``hard`` setting (more noise, fainter and smaller lesions), 2 folds."""
    world = synthetic.make_world(
        root / "world",
        synthetic.WorldSpec(n_train=240, n_test=4, seed=seed, **synthetic.DIFFICULTIES["hard"]),
        workers=2,
        progress=False,
    )
    processed = root / "processed"
    meta = prepare_world(world, processed, (HARD_SIZE,))
    exp = paths.ExperimentDir(root / "models" / "hard", HARD_SIZE)
    exp.root.mkdir(parents=True)
    atomic.write_csv(exp.folds, splitting.make_folds(meta[meta["split"] == "train"], n_folds=2, seed=0))
    return processed, exp


@pytest.fixture()
def two_torch_threads():
    """The hard-world margins were measured with 2 torch threads: the thread count changes the order of float
    reductions, and so a short run's path (with 1 thread, seed 21 scored +0.035). Fixed, the test means the
    same on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.trains
@pytest.mark.parametrize("seed", [21, 22])
def test_short_run_on_a_hard_world_beats_all_empty_after_the_search(tmp_path, seed, prepare_world, two_torch_threads):
    processed, exp = _hard_world(tmp_path, seed, prepare_world)
    cfg = config.load("demo", [f"data.sizes=[{HARD_SIZE}]", "data.n_folds=2", f"seed={seed}", HARD_STAGE])
    segmentation.train_fold(cfg, 0, processed, exp, device="cpu", progress=False)
    no_gate = replace(cfg, classifier=replace(cfg.classifier, enabled=False))  # this test trains no classifier
    oof.predict_oof(no_gate, exp, paths.ProcessedDir(processed), "cpu", progress=False, folds=[0])
    ids = pd.read_csv(exp.oof_ids(0), dtype={"image_id": str})
    masks = prepared.load_cache(processed, "masks", "train", HARD_SIZE)[ids["index"].to_numpy()] > 0
    found = exact_search.search_oof([exact_search.OOFPart(np.load(exp.oof_maps(0)), masks, None)], cfg.postprocess)
    all_empty = float((~masks.reshape(len(masks), -1).any(axis=1)).mean())
    # Runs that never left the all-empty minimum scored +0.000 to +0.019 here (20-30 epochs; at 96 pixels too).
    # Learning runs, seeds 21 to 26: +0.036 / +0.063 / +0.029 / +0.021 / +0.039 / +0.039 with the model in
    # channels_last (as it trains on CPU since 2026-12-06), +0.049 / +0.060 / +0.027 / +0.033 / +0.031 / +0.041
    # contiguous: one distribution, seed to seed. The bound is above every run that did not learn and under 11
    # of the 12 that did (both test seeds, either format); 0.04 had tested the two seeds' luck under one float
    # rounding (seeds 23 to 25 fell under it in either format).
    assert found.score > all_empty + 0.025, (found.score, all_empty)


def _states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _experiment(processed, root):
    import shutil

    out = paths.ExperimentDir(root, 64)
    out.root.mkdir(parents=True)
    shutil.copy(processed / "folds.csv", out.folds)
    return out


def _weights(run):
    return checkpoints.load_checkpoint(run.model)["state_dict"]


@pytest.mark.trains
def test_resume_after_interruption_matches_uninterrupted(processed, tmp_path):
    cfg = config.load("tiny", ["segmentation.stages.0.epochs=2"])  # 2 + 1 epochs, SWA in stage 2
    whole = _experiment(processed, tmp_path / "whole")
    segmentation.train_fold(cfg, 1, processed, whole, device="cpu", progress=False)
    parts = _experiment(processed, tmp_path / "parts")
    run = parts.segmenter(1)
    with pytest.raises(Interrupted):
        segmentation.train_fold(cfg, 1, processed, parts, device="cpu", progress=False, max_epochs=1)
    assert not run.model.exists() and run.state.exists()
    # mid-stage: the resume point, metrics and curves of the epoch done; last.pt waits for the stage's end
    assert len(pd.read_csv(run.metrics)) == 1 and run.curves.exists() and not run.weights("last").exists()
    with pytest.raises(Interrupted):  # resumes at epoch 2, stops again after the stage boundary
        segmentation.train_fold(cfg, 1, processed, parts, device="cpu", progress=False, max_epochs=1)
    assert run.weights("last").exists()  # stage 0 ended
    segmentation.train_fold(cfg, 1, processed, parts, device="cpu", progress=False)
    a, b = pd.read_csv(whole.segmenter(1).metrics), pd.read_csv(run.metrics)
    assert len(a) == len(b) == 4  # 3 epochs + one SWA evaluation
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    assert _states_equal(_weights(whole.segmenter(1)), _weights(run))


@pytest.mark.trains
def test_validating_every_other_epoch_trains_the_same_weights(processed, tmp_path):
    """Validation draws no random number that training uses: skipping it changes the rows, not the model."""
    stage = ["segmentation.stages.0.epochs=3"]
    every = _experiment(processed, tmp_path / "every")
    segmentation.train_fold(config.load("tiny", stage), 0, processed, every, device="cpu", progress=False)
    other = _experiment(processed, tmp_path / "other")
    cfg = config.load("tiny", [*stage, "segmentation.stages.0.validate_every=2"])
    segmentation.train_fold(cfg, 0, processed, other, device="cpu", progress=False)
    assert _states_equal(_weights(every.segmenter(0)), _weights(other.segmenter(0)))
    rows = pd.read_csv(other.segmenter(0).metrics)
    # epoch 1 skipped; epoch 2, epoch 3 (the stage's end), epoch 4 (stage 1) and the SWA row validated
    assert rows["val_dice"].isna().tolist() == [True, False, False, False, False]
    np.testing.assert_allclose(rows["train_loss"], pd.read_csv(every.segmenter(0).metrics)["train_loss"], rtol=0)
    with pytest.raises(config.ConfigError, match=r"stages\[0\]\.validate_every"):
        config.load("tiny", ["segmentation.stages.0.validate_every=2", "segmentation.stages.0.scheduler=plateau"])


@pytest.mark.trains
def test_a_changed_config_retrains_and_an_unchanged_one_does_nothing(processed, exp, capfd):
    cfg = config.load("tiny")
    run = exp.segmenter(0)
    segmentation.train_fold(cfg, 0, processed, exp, device="cpu", progress=False)
    first, stamp = _weights(run), run.model.stat().st_mtime_ns
    # Settings no training reads (post-processing, inference, speed) leave the fold alone.
    same = config.load("tiny", ["postprocess.r_th=[0, 512]", "infer.batch_size=3", "data.workers=1", "compile=true"])
    segmentation.train_fold(same, 0, processed, exp, device="cpu", progress=False)
    assert run.model.stat().st_mtime_ns == stamp and not list(exp.root.glob("fold0.stale-*"))
    # A stage's learning rate is a different run: the old one is moved aside, never resumed.
    changed = config.load("tiny", ["segmentation.stages.1.lr=0.01"])
    capfd.readouterr()
    segmentation.train_fold(changed, 0, processed, exp, device="cpu", progress=False)
    err = capfd.readouterr().err
    assert "segmentation.stages" in err and "moved to" in err and "training from scratch" in err
    stale = list(exp.root.glob("fold0.stale-*"))
    assert len(stale) == 1 and _states_equal(checkpoints.load_checkpoint(stale[0] / "model.pt")["state_dict"], first)
    assert not _states_equal(_weights(run), first)
    assert config.from_yaml(run.config.read_text()) == changed  # the saved config is the one trained
    assert len(pd.read_csv(run.metrics)) == 3  # trained from epoch 1, not resumed


@pytest.mark.trains
def test_a_changed_split_is_a_changed_run(processed, exp):
    cfg = config.load("tiny")
    segmentation.train_fold(cfg, 0, processed, exp, device="cpu", progress=False)
    folds = pd.read_csv(exp.folds)
    moved = folds.index[folds["fold"] == 1][0]
    folds.loc[moved, "fold"] = 0  # one image changes folds
    folds.to_csv(exp.folds, index=False)
    from pneumothorax.data import folds as folds_mod

    with pytest.raises(folds_mod.SplitError, match="trained on another split"):
        folds_mod.check_split(exp.segmenter(0), folds, 0)
    segmentation.train_fold(cfg, 0, processed, exp, device="cpu", progress=False)  # retrains on the new split
    folds_mod.check_split(exp.segmenter(0), folds, 0)
    assert len(list(exp.root.glob("fold0.stale-*"))) == 1


@pytest.mark.trains
def test_every_collective_survives_a_group_without_a_cpu_backend(processed, exp):
    """The multi-GPU crash (a CPU tensor broadcast on an NCCL group) reproduced and prevented on CPU."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = paths.ROOT / "tests" / "ddp_cuda_only_group.py"
    out = exp.segmenter(0).root
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(script), str(processed), str(exp.root)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    refused = "default group refuses CPU tensors: No backend type associated with device type cpu"
    assert result.stdout.count(refused) == 2
    assert result.stdout.count("trained") == 2 and (out / "model.pt").exists()
    assert len(pd.read_csv(out / "metrics.csv")) == 3  # 2 epochs + SWA, through DDP, validation and SWA broadcast
    cls = pd.read_csv(exp.classifier(0).metrics)  # the classifier: validation gathered from both ranks
    assert len(cls) == 2 and cls["val_auc"].between(0, 1).all() and exp.classifier(0).model.exists()


def test_device_choice_never_falls_back_to_cpu_silently(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: "NVRM version: NVIDIA UNIX x86_64 Kernel Module 470.57")
    with pytest.raises(devices.DeviceError, match="a GPU is present .*470.57.* cannot use it.*--device cpu"):
        devices.pick_device(None, 0)
    assert devices.pick_device("cpu", 0) == torch.device("cpu")  # asked for knowingly
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: None)
    assert devices.pick_device(None, 0) == torch.device("cpu")
    assert devices.describe_device(torch.device("cpu")).startswith("device cpu (")


def test_cuda_rng_state_is_the_current_devices(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    state = checkpoints.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    checkpoints.set_rng_state(state)
    four_gpus = {**state, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(4)]}  # saved on 4 GPUs
    checkpoints.set_rng_state(four_gpus)  # resumed on one: no IndexError, one generator set
    assert [int(t) for t in restored] == [7, 0]


def _gather_in_two_processes(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    runtime = devices.Runtime(torch.device("cpu"), rank, 2, dist.group.WORLD)
    mine = np.arange(rank, 7, 2, dtype=float) * 10  # this rank's items: rank::2 of 7
    np.save(f"{out}/rank{rank}.npy", devices.gather_shards(mine, 7, runtime))
    dist.destroy_process_group()


@pytest.mark.trains
def test_shards_gather_back_in_item_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    assert (devices.gather_shards(np.arange(3.0), 3, devices.Runtime(torch.device("cpu"))) == np.arange(3.0)).all()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gather_in_two_processes, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert np.load(tmp_path / f"rank{rank}.npy").tolist() == [0, 10, 20, 30, 40, 50, 60]


def test_dice_on_the_device_equals_the_competition_metric():
    rng = np.random.default_rng(3)
    masks = rng.random((12, 1, 16, 16)) < 0.2
    masks[:4] = False  # empty truths: both empty scores 1, a prediction on them 0
    logits = rng.normal(size=(12, 1, 16, 16)) - 0.5
    logits[1] = -5.0  # empty prediction on empty truth
    dice, iou = segmentation.dice_iou_on_device(torch.from_numpy(logits), torch.from_numpy(masks.astype(np.float32)))
    np.testing.assert_allclose(dice.numpy(), metric.dice_per_image(logits[:, 0] > 0, masks[:, 0]), atol=1e-12)
    np.testing.assert_allclose(iou.numpy(), metric.iou_per_image(logits[:, 0] > 0, masks[:, 0]), atol=1e-12)
    assert dice[1] == 1.0 and dice[0] == 0.0
