"""The one training engine on a task of the test's own: gradient accumulation equals the larger batch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pneumothorax.io import atomic
from pneumothorax.io.config import StageConfig
from pneumothorax.io.paths import RunDir
from pneumothorax.models import devices
from pneumothorax.train import checkpoints
from pneumothorax.train.trainer import Averaging, Interrupted, Precision, Settings, Trainer


class Pairs(Dataset):
    """uint8 images whose target is a fixed linear function of them (a task any conv net can fit)."""

    def __init__(self, n: int = 32) -> None:
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.integers(0, 255, (n, 1, 8, 8), dtype=np.uint8))
        self.y = (self.x.float() / 255 > 0.5).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Ordered(torch.utils.data.Sampler):
    """The same order every epoch, whatever the batch size (set_epoch is the trainer's hook)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng(self.epoch).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class NoNormTask:
    """A batch-norm-free conv net: its gradients do not depend on how a batch is split."""

    curves = [("train_loss", "train loss"), ("val_loss", "val loss")]
    log_keys = ("val_loss",)
    select_from = 0
    precision = Precision()
    label = "toy"

    def __init__(self, batch: int, accumulate: int, epochs: int = 2, averaging: Averaging | None = None) -> None:
        self.batch, self.averaging = batch, averaging or Averaging()
        self.stages = (StageConfig(epochs=epochs, lr=0.01, batch_size=batch, size=8, accumulate=accumulate),)
        self.data = Pairs()

    def build_model(self, log) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))

    def loaders(self, p, runtime):
        sampler = Ordered(len(self.data))
        return DataLoader(self.data, batch_size=self.batch, sampler=sampler), sampler

    def loss(self, outputs, targets):
        return nn.functional.binary_cross_entropy_with_logits(outputs, targets)

    def validate(self, model, p, runtime):
        with torch.no_grad():
            x = (self.data.x.float() / 255 - 0.5) / 0.25
            return {"val_loss": float(self.loss(model(x), self.data.y))}

    def monitor(self, scores):
        return -scores["val_loss"]

    def bn_loader(self, p, runtime):
        raise NotImplementedError

    def finish(self, run, runtime, progress):
        return {}, "last"


def _train(tmp_path, name: str, batch: int, accumulate: int) -> dict:
    settings = Settings(0, False, False, 1, {"batch": batch, "accumulate": accumulate}, "toy: true\n")
    run = RunDir(tmp_path / name)
    Trainer(NoNormTask(batch, accumulate), run, settings, devices.Runtime(torch.device("cpu")), progress=False).fit()
    return checkpoints.load_checkpoint(run.model)["state_dict"]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big = _train(tmp_path, "big", 8, 1)
    accumulated = _train(tmp_path, "acc", 4, 2)
    small = _train(tmp_path, "small", 4, 1)
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(small[key], big[key], atol=1e-4) for key in big)  # a smaller batch alone differs


class ChannelsLastTask(NoNormTask):
    """The toy task with ``channels_last`` on: records the memory format its model trains in."""

    precision = Precision(channels_last=True)

    def validate(self, model, p, runtime):
        self.formats = getattr(self, "formats", []) + [model[2].weight.is_contiguous()]
        return super().validate(model, p, runtime)


def test_channels_last_is_honoured_on_cpu_and_learns_the_same_weights(tmp_path):
    """On CPU too (2 cores: real_cpu's gate step 1.2-1.3x, its U-Net's 1.3-1.4x faster, make bench-train), it trains in
    channels_last, and to the contiguous run's weights up to float rounding."""
    settings = Settings(0, False, False, 1, {"batch": 8}, "toy: true\n")
    cpu = devices.Runtime(torch.device("cpu"))
    task = ChannelsLastTask(8, 1)
    Trainer(task, RunDir(tmp_path / "cl"), settings, cpu, progress=False).fit()
    assert task.formats == [False, False]  # the (1, 4, 3, 3) conv's weight is strided as channels_last
    in_channels_last = checkpoints.load_checkpoint(RunDir(tmp_path / "cl").model)["state_dict"]
    contiguous = _train(tmp_path, "contiguous", 8, 1)
    for key in contiguous:
        torch.testing.assert_close(in_channels_last[key], contiguous[key], rtol=1e-4, atol=1e-5)


class Bf16Task(NoNormTask):
    """The toy task with ``cpu_bf16`` on: records (a training step?, output dtype) of every forward of its model (the
    toy validates without grad, its model not switched to eval)."""

    precision = Precision(cpu_bf16=True)

    def build_model(self, log) -> nn.Module:
        model = super().build_model(log)
        self.calls: list[tuple[bool, torch.dtype]] = []
        model.register_forward_hook(lambda module, _, out: self.calls.append((torch.is_grad_enabled(), out.dtype)))
        return model


def test_cpu_bf16_autocasts_the_training_steps_only_and_learns_as_fp32_does(tmp_path, monkeypatch):
    """``cpu_bf16`` (real_cpu's gate and U-Net steps 1.5-1.6x faster on 2 avx512_bf16 cores, make bench-train): every
    training forward runs in bf16 on such a CPU, validation stays fp32, and the weights follow the fp32 run's
    closely without being its (the autocast really applied). On a CPU without bf16 instructions the run trains in
    fp32, to the fp32 run's very weights, and its log says why."""
    settings = Settings(0, False, False, 1, {"batch": 8}, "toy: true\n")
    cpu = devices.Runtime(torch.device("cpu"))
    fp32 = _train(tmp_path, "fp32", 8, 1)
    assert "cpu_bf16" not in RunDir(tmp_path / "fp32").log.read_text()
    for native, name in ((True, "bf16"), (False, "emulated")):
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda native=native: native)
        task, run = Bf16Task(8, 1), RunDir(tmp_path / name)
        Trainer(task, run, settings, cpu, progress=False).fit()
        steps = [dtype for stepping, dtype in task.calls if stepping]
        assert len(steps) == 2 * 4 and set(steps) == {torch.bfloat16 if native else torch.float32}  # 2 x 4 batches
        assert [dtype for stepping, dtype in task.calls if not stepping] == [torch.float32] * 2  # validation
        weights, log = checkpoints.load_checkpoint(run.model)["state_dict"], run.log.read_text()
        if not native:
            assert "neither avx512_bf16 nor amx_bf16" in log and "training in fp32" in log
            for key in fp32:
                torch.testing.assert_close(weights[key], fp32[key], rtol=0, atol=0)
            continue
        assert "training steps under bf16 autocast" in log
        assert any(not torch.allclose(weights[key], fp32[key], atol=1e-6) for key in fp32)
        for key in fp32:
            torch.testing.assert_close(weights[key], fp32[key], rtol=0.05, atol=0.01)
        losses = [pd.read_csv(RunDir(tmp_path / n).metrics)["val_loss"].iloc[-1] for n in (name, "fp32")]
        assert losses[0] == pytest.approx(losses[1], rel=0.02)


def test_top_k_epochs_are_kept_and_averaged_and_the_ema_resumes_exactly(tmp_path):
    averaging = Averaging(top_k=2, ema_decay=0.9)
    settings = Settings(0, False, False, 1, {"averaging": "on"}, "toy: true\n")
    cpu = devices.Runtime(torch.device("cpu"))
    whole = RunDir(tmp_path / "whole")
    Trainer(NoNormTask(8, 1, 5, averaging), whole, settings, cpu, progress=False).fit()
    metrics = pd.read_csv(whole.metrics)
    best_two = sorted(metrics.nsmallest(2, "val_loss")["epoch"].tolist())
    kept = sorted(int(p.stem.split("-e")[1]) for p in whole.root.glob("top-e*.pt"))
    assert kept == best_two  # exactly the two best epochs by the monitored score
    tops = [checkpoints.load_checkpoint(whole.weights(f"top-e{e}")) for e in kept]
    mean = checkpoints.load_checkpoint(whole.weights("topk"))
    for key in mean:
        torch.testing.assert_close(mean[key], (tops[0][key] + tops[1][key]) / 2)
    ema, last = checkpoints.load_checkpoint(whole.weights("ema")), checkpoints.load_checkpoint(whole.weights("last"))
    assert any(not torch.allclose(ema[k], last[k]) for k in ema)
    parts = RunDir(tmp_path / "parts")
    with pytest.raises(Interrupted):
        Trainer(NoNormTask(8, 1, 5, averaging), parts, settings, cpu, progress=False, max_epochs=2).fit()
    Trainer(NoNormTask(8, 1, 5, averaging), parts, settings, cpu, progress=False).fit()
    resumed = checkpoints.load_checkpoint(parts.weights("ema"))
    for key in ema:
        torch.testing.assert_close(resumed[key], ema[key], rtol=0, atol=0)


def test_a_second_trainer_of_the_same_run_waits_then_finds_it_done(tmp_path, capfd):
    """Two jobs on one fold: the second waits on the run's lock instead of writing the same state.pt."""
    run, runtime = RunDir(tmp_path / "fold0"), devices.Runtime(torch.device("cpu"))
    settings = Settings(0, False, False, 1, {"batch": 8}, "toy: true\n")
    first = Trainer(NoNormTask(8, 1), run, settings, runtime, progress=False)
    second = Trainer(NoNormTask(8, 1), run, settings, runtime, progress=False)
    results = {}
    with atomic.locked(run.lock, "the first job"):  # the first job, mid-training
        waiting = threading.Thread(target=lambda: results.setdefault("second", second.fit()))
        waiting.start()
        waiting.join(timeout=2.0)
        assert waiting.is_alive() and not run.root.exists(), "the second trainer did not wait for the lock"
        results["first"] = first._fit()
    waiting.join(timeout=60)
    assert not waiting.is_alive()
    assert "waiting: toy" in capfd.readouterr().err
    assert results["second"] == results["first"] and len(pd.read_csv(run.metrics)) == 2  # not trained twice


def test_tensorboard_gets_the_rows_of_metrics_csv_the_config_and_the_final_scores(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pneumothorax.train.tracking import Tracking

    run = RunDir(tmp_path / "fold0")
    settings = Settings(0, False, False, 1, {"batch": 8}, "toy: tensorboard\n", Tracking("tensorboard"))
    Trainer(NoNormTask(8, 1, 3), run, settings, devices.Runtime(torch.device("cpu")), progress=False).fit()
    events = EventAccumulator(str(run.tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = pd.read_csv(run.metrics)
    for tag in ("train_loss", "val_loss", "lr"):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == metrics["epoch"].tolist() == [1, 2, 3]
        np.testing.assert_allclose([e.value for e in logged], metrics[tag], rtol=1e-6)
    assert events.Scalars("final/epochs")[0].value == 3
    assert "toy: tensorboard" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_mlflow_gets_the_same_rows_and_a_resumed_run_logs_into_the_same_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from pneumothorax.train.tracking import Tracking

    uri = (tmp_path / "mlruns").as_uri()
    run, cpu = RunDir(tmp_path / "fold0"), devices.Runtime(torch.device("cpu"))
    settings = Settings(0, False, False, 1, {"batch": 8}, "toy: mlflow\n", Tracking("mlflow", uri, "toy-exp"))
    with pytest.raises(Interrupted):
        Trainer(NoNormTask(8, 1, 3), run, settings, cpu, progress=False, max_epochs=2).fit()
    Trainer(NoNormTask(8, 1, 3), run, settings, cpu, progress=False).fit()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("toy-exp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run.mlflow_run_id.read_text().strip()
    metrics = pd.read_csv(run.metrics)
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    np.testing.assert_allclose([m.value for m in history], metrics["train_loss"], rtol=1e-6)
    assert runs[0].data.metrics["final/epochs"] == 3 and runs[0].info.status == "FINISHED"
    config = client.download_artifacts(runs[0].info.run_id, "config.yaml", str(tmp_path))
    assert Path(config).read_text() == "toy: mlflow\n"


def test_a_backend_that_is_not_installed_fails_before_training(tmp_path, monkeypatch):
    import sys

    from pneumothorax.train.tracking import Tracking, TrackingError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    run = RunDir(tmp_path / "fold0")
    settings = Settings(0, False, False, 1, {"batch": 8}, "toy: true\n", Tracking("tensorboard"))
    with pytest.raises(TrackingError, match=r"pip install 'pneumothorax\[track\]'"):
        Trainer(NoNormTask(8, 1, 3), run, settings, devices.Runtime(torch.device("cpu")), progress=False).fit()
    assert not run.state.exists()


class EncoderTask(NoNormTask):
    """The toy task on a net with an ``encoder`` (as smp's models have) and a head."""

    def build_model(self, log) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Module()
        net.encoder = nn.Conv2d(1, 4, 3, padding=1)
        net.head = nn.Conv2d(4, 1, 3, padding=1)
        net.forward = lambda x: net.head(torch.relu(net.encoder(x)))
        return net


def test_the_encoder_stays_frozen_for_the_first_epochs_of_a_stage(tmp_path):
    task = EncoderTask(8, 1, 3)
    task.stages = (StageConfig(epochs=3, lr=0.01, batch_size=8, size=8, freeze_encoder_epochs=2),)
    initial = {k: v.clone() for k, v in task.build_model(None).state_dict().items()}
    run, cpu = RunDir(tmp_path / "fold0"), devices.Runtime(torch.device("cpu"))
    settings = Settings(0, False, False, 1, {"freeze": 2}, "toy: true\n")
    with pytest.raises(Interrupted):
        Trainer(task, run, settings, cpu, progress=False, max_epochs=2).fit()
    after_two = checkpoints.load_checkpoint(run.state)["model"]
    assert all(torch.equal(after_two[k], initial[k]) for k in ("encoder.weight", "encoder.bias"))
    assert not torch.equal(after_two["head.weight"], initial["head.weight"])  # the rest trained meanwhile
    Trainer(task, run, settings, cpu, progress=False).fit()
    after_three = checkpoints.load_checkpoint(run.model)["state_dict"]
    assert not torch.equal(after_three["encoder.weight"], initial["encoder.weight"])  # the third epoch trains it
