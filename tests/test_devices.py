"""The CUDA path's traps, reproduced on the CPU: SyncBN copies, a failing rank, batches that do not split, a CPU
run resumed with fp16, compile with SyncBN, the EMA without host syncs, SWA statistics on equal shards."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pneumothorax.io import config
from pneumothorax.models import devices
from pneumothorax.train import trainer
from pneumothorax.train.ema import Ema


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))


@pytest.fixture()
def gloo_group(tmp_path):
    """A one-process gloo group, as torchrun would make (a real ProcessGroup object)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_sync_bn_weights_can_be_copied_for_swa_and_ema(gloo_group):
    """convert_sync_batchnorm with the runtime's group stored the ProcessGroup in every norm layer, and the
    SWA/EMA copies (deepcopy) failed: "cannot pickle 'ProcessGroup' object"."""
    model = devices.sync_batchnorm(_bn_net())  # what wrap_ddp does before DDP (which takes CUDA modules only)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(TypeError, match="ProcessGroup"):  # the pattern that crashed every recipe with sync_bn
        copy.deepcopy(nn.SyncBatchNorm.convert_sync_batchnorm(_bn_net(), process_group=gloo_group))
    AveragedModel(model)  # SWA
    Ema(model, 0.9)  # EMA


FAILING_RANK = """
import sys, time, torch
from pneumothorax.models import devices
with devices.running("cpu") as runtime:
    if runtime.rank == 1:
        raise RuntimeError("rank 1 failed")
    devices.sum_over_ranks(torch.ones(1), runtime)  # rank 0 waits in a collective rank 1 never joins
"""


@pytest.mark.trains
def test_a_failing_rank_ends_the_job_at_once(tmp_path):
    """Its teardown used to enter a barrier while the others waited in an all-reduce: every rank hung until the
    30-minute watchdog. Now the failing rank exits, and torchrun stops the others."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    started = time.time()
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(script)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode != 0 and "rank 1 failed" in done.stderr
    assert time.time() - started < 90


def test_every_batch_of_a_recipe_is_checked_against_the_process_count_at_start():
    devices.check_batches(config.load("2st_exp5"), 4)  # 64 and 16 split over 4
    with pytest.raises(config.ConfigError) as found:
        devices.check_batches(config.load("2st_exp5", ["segmentation.stages.1.batch_size=14"]), 4)
    assert "segmentation.stages[1].batch_size=14" in str(found.value) and "stages[0]" not in str(found.value)
    with pytest.raises(config.ConfigError, match=r"segmentation.stages\[1\].batch_size=2: .* the 8 processes"):
        devices.check_batches(config.load("1st_place"), 8)
    with pytest.raises(config.ConfigError, match=r"classifier.batch_size=8"):
        devices.check_batches(config.load("demo"), 3)


def test_a_cpu_run_resumes_with_an_enabled_scaler():
    """A run started on the CPU saved its disabled scaler's empty state, which an enabled one refuses."""
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        enabled.load_state_dict(saved)
    trainer.restore_scaler(enabled, saved)  # starts afresh instead
    assert enabled.get_scale() == torch.amp.GradScaler("cpu", enabled=True).get_scale()
    scaled = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0)
    trainer.restore_scaler(enabled, scaled.state_dict())  # a real state is restored
    assert enabled.get_scale() == 128.0


def test_compile_with_sync_bn_is_refused_at_load():
    with pytest.raises(config.ConfigError, match="compile: true with segmentation.sync_bn: true is unsupported"):
        config.load("demo", ["compile=true", "segmentation.sync_bn=true"])


def test_the_ema_equals_averaged_models_without_its_host_sync():
    model = _bn_net()
    ours, theirs = Ema(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        model(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(step))).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model)
        theirs.update_parameters(model)
    for key, value in theirs.module.state_dict().items():
        if value.is_floating_point():  # (AveragedModel also "averages" num_batches_tracked; ours keeps the model's)
            torch.testing.assert_close(ours.module.state_dict()[key], value)
    restored = Ema(_bn_net(), 0.9)
    restored.load_state_dict(theirs.state_dict())  # a run from before resumes its AveragedModel's EMA
    assert restored.started
    for key, value in theirs.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[key], value)


def test_swa_statistics_shards_are_equal_on_every_rank(processed, exp):
    """Under SyncBatchNorm every forward of the SWA statistics pass is a collective: a rank with one batch more
    would wait forever."""
    from pneumothorax.io.paths import ProcessedDir
    from pneumothorax.train.segmentation import SegmentationTask

    cfg = config.load("tiny", ["segmentation.swa_bn_images=0"])
    task = SegmentationTask(cfg, 0, ProcessedDir(processed), exp)
    assert len(task.train_df) % 4  # shards of unequal length before the cut
    for world in (2, 4, 8):
        sizes = {len(task.bn_loader(1, devices.Runtime(torch.device("cpu"), r, world)).dataset) for r in range(world)}
        assert len(sizes) == 1, (world, sizes)
        assert sizes.pop() == len(task.train_df) // world


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    """``cpu_bf16`` pays only where the CPU has bf16 instructions (make bench-train's real_cpu section); training
    warns elsewhere, so the flags must be read exactly: the flags line, whole words, not a substring of another."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert devices.cpu_has_native_bf16(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 amx_tile amx_bf16\n")
    assert devices.cpu_has_native_bf16(info) is True
    info.write_text("model name\t: avx512_bf16 lookalike\nflags\t\t: fpu sse2 avx512f avx512_bf16x\n")
    assert devices.cpu_has_native_bf16(info) is False
    info.write_text("processor\t: 0\n")
    assert devices.cpu_has_native_bf16(info) is None
    assert devices.cpu_has_native_bf16(tmp_path / "absent") is None
