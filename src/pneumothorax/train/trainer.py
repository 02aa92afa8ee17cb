"""The one training engine. A :class:`Trainer` owns the loop; a small task object says what is trained.

The trainer (as nnU-Net's ``nnUNetTrainer.run_training``) owns: the run folder and its
fingerprint, resume from ``state.pt``, seeding, DDP, AMP and its gradient scaler,
channels_last, gradient clipping, per-stage optimiser and schedule, SWA (batch-norm statistics
included), ``best``/``last`` checkpoints, ``metrics.csv``, ``train.log``, ``curves.png`` and
the ``model.pt`` marker, written last with its metadata. A stage (:class:`~pneumothorax.io.config.StageConfig`)
is a stretch with its own optimiser, schedule and input size: a segmentation stage, or the classifier's
single stage.

A task (:class:`Task`; :class:`pneumothorax.train.segmentation.SegmentationTask` and
:class:`pneumothorax.train.classifier.ClassifierTask`) builds the model, its loaders, its loss,
validates, and predicts its out-of-fold output at the end. Hooks for more (EMA weights, say)
go in :meth:`Trainer._after_step`, the one place every optimiser step passes.

**A changed config is never resumed.** The values a run depends on (its config section, see
:data:`pneumothorax.io.freshness.STEPS`, plus its split and, for a fold, the hash of the training
inputs' manifest) are fingerprinted into ``state.pt`` and ``model.pt``, and written out as
``trained_under.json`` beside a finished model (Make's stamps compare with it). A run folder
with another fingerprint is moved aside to ``<run>.stale-<old fingerprint>`` (the log names the
keys that changed) and training starts from scratch; a finished run with the same fingerprint is
not trained again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pneumothorax.data import datasets
from pneumothorax.data import folds as folds_mod
from pneumothorax.io import atomic, freshness, manifest, plots, progress_bars
from pneumothorax.io import config as config_mod
from pneumothorax.io.config import StageConfig
from pneumothorax.io.paths import ExperimentDir, ProcessedDir, RunDir
from pneumothorax.models import devices
from pneumothorax.models.devices import Runtime
from pneumothorax.train import checkpoints
from pneumothorax.train import tracking as tracking_mod
from pneumothorax.train.ema import Ema

CURVES_EVERY_S = 30.0  # curves.png is redrawn at most this often before the last epoch


class Interrupted(RuntimeError):
    """Raised by ``max_epochs`` to simulate a killed run (tests)."""


@dataclass(frozen=True)
class Averaging:
    """Weights kept beside the trained ones: the k best epochs (averaged into ``topk.pt``), and an EMA."""

    top_k: int = 0
    ema_decay: float = 0.0


@dataclass(frozen=True)
class Precision:
    """How the task's model computes: AMP on CUDA, memory format, clipping, batch-norm sync, and bf16 autocast
    of the training steps on a CPU with bf16 instructions (validation and every prediction stay in fp32 there)."""

    amp: str = "none"
    channels_last: bool = False
    grad_clip: float = 0.0
    sync_bn: bool = False
    cpu_bf16: bool = False


class Task(Protocol):
    """What a trainer needs from a task."""

    label: str  # "segmentation fold 0": log lines and bars
    stages: tuple[StageConfig, ...]
    precision: Precision
    curves: list[tuple[str, str]]  # (metrics column, title) panels of curves.png
    log_keys: tuple[str, ...]  # validation scores in the per-epoch log line
    select_from: int  # best.pt (and the top-k epochs) are chosen among this stage's epochs and later ones
    averaging: Averaging

    def build_model(self, log: logging.Logger) -> nn.Module: ...
    def loaders(self, stage: int, runtime: Runtime) -> tuple[Any, Any]: ...  # train loader, its sampler
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...
    def validate(self, model: nn.Module, stage: int, runtime: Runtime) -> dict[str, float]: ...
    def monitor(self, scores: dict[str, float]) -> float: ...  # higher is better: best.pt, plateau schedule
    def bn_loader(self, stage: int, runtime: Runtime) -> Any: ...
    def finish(self, run: RunDir, runtime: Runtime, progress: bool) -> tuple[dict[str, Any], str]: ...


@dataclass(frozen=True)
class Settings:
    """The config values every task trains under, and the run's identity."""

    seed: int
    deterministic: bool
    compile: bool
    channels: int
    section: dict[str, Any]  # the resolved values the run depends on (its fingerprint's source)
    config_text: str  # the whole resolved config, saved beside the weights
    tracking: tracking_mod.Tracking = tracking_mod.Tracking()  # where metrics go besides metrics.csv

    @property
    def fingerprint(self) -> str:
        return freshness.fingerprint(self.section)


def make_logger(path: Any, name: str, enabled: bool = True) -> logging.Logger:
    """One readable line per event: appended to ``path`` (a resumed run keeps its history) and on stderr."""
    logger = logging.getLogger(f"pneumothorax.{name}.{os.getpid()}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None and enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def optimizer_for(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (AdamW when weight decay is set)."""
    if weight_decay:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr)


def scheduler_for(opt: torch.optim.Optimizer, stage: StageConfig) -> Any:
    """Per-epoch schedule: cosine annealing to ``min_lr``, ReduceLROnPlateau on the val score, or constant."""
    if stage.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, stage.epochs), eta_min=stage.min_lr)
    if stage.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=stage.plateau_factor, patience=stage.plateau_patience, min_lr=stage.min_lr
        )
    if stage.scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown scheduler {stage.scheduler!r}; choose cosine, plateau or constant")


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """A resumed run's gradient scaler. A run started without fp16 (on the CPU, say) saved the disabled scaler's
    empty state, which an enabled one refuses: it then starts afresh, as at the start of a run."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


@torch.no_grad()
def update_bn(model: nn.Module, loader: Any, runtime: Runtime, amp: str, channels: int, channels_last: bool) -> None:
    """Recompute the batch-norm statistics of ``model`` (SWA weights) from ``loader``, as
    ``torch.optim.swa_utils.update_bn`` does, but under autocast and in channels_last, over the
    images the caller chose; under DDP each rank passes its share and the statistics are averaged."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch
    training = model.training
    model.train()
    for images, _ in loader:
        with devices.autocast(runtime.device, amp):
            model(datasets.model_input(images, channels, runtime.device, channels_last))
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
        for stat in (bn.running_mean, bn.running_var):
            devices.sum_over_ranks(stat, runtime).div_(runtime.world_size)
    model.train(training)


def read_meta(path: Any) -> dict[str, Any]:
    """The metadata saved with ``model.pt`` or ``state.pt`` (empty for files written before fingerprints)."""
    state = checkpoints.load_checkpoint(path)
    return state.get("meta", {}) if isinstance(state, dict) else {}


class Trainer:
    """Trains one task into one run folder, resuming where a killed run stopped."""

    def __init__(
        self,
        task: Task,
        run: RunDir,
        settings: Settings,
        runtime: Runtime,
        progress: bool = True,
        max_epochs: int | None = None,
    ) -> None:
        self.task, self.run, self.settings, self.runtime = task, run, settings, runtime
        self.progress, self.max_epochs = progress, max_epochs
        self.plan = [(p, e) for p, stage in enumerate(task.stages) for e in range(stage.epochs)]
        self.done, self.history, self.best = 0, [], float("-inf")
        self.state: dict[str, Any] | None = None
        self.frozen: list[nn.Parameter] = []  # parameters the optimiser leaves alone this epoch
        self.stage_index = -1
        # when curves.png was last drawn: a call shorter than CURVES_EVERY_S draws it once, at its end
        self.curves_drawn = time.monotonic()

    @property
    def meta(self) -> dict[str, Any]:
        return {"fingerprint": self.settings.fingerprint, "section": self.settings.section}

    def fit(self) -> dict[str, Any]:
        """Train every remaining epoch, then predict out-of-fold and write ``model.pt``; return the summary.

        Rank 0 holds the run's lock throughout: a second job on the same fold (two ``make`` calls,
        a requeued array task) waits, then finds the run finished or resumes it, instead of two
        trainers writing one ``state.pt``.
        """
        held = atomic.locked(self.run.lock, f"{self.task.label} ({self.run.root})")
        with held if self.runtime.is_main else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        self._set_aside_stale()
        if self.run.model.exists():  # finished under this very config: nothing to do
            return read_meta(self.run.model).get("summary", {})
        self._start()
        for ran, step in enumerate(range(self.done, len(self.plan)), 1):
            stops = self.max_epochs is not None and ran >= self.max_epochs and step + 1 < len(self.plan)
            self._epoch(step, stops)
            if stops:
                raise Interrupted(f"stopped after {ran} epoch(s) as asked")
        return self._finish()

    def _set_aside_stale(self) -> None:
        """Move a run trained under other values out of the way (rank 0), telling which keys changed."""
        found = self.run.model if self.run.model.exists() else self.run.state
        if not found.exists():
            return
        old = read_meta(found)
        if old.get("fingerprint") == self.settings.fingerprint:
            return
        if self.runtime.is_main:
            stale = self.run.stale(old.get("fingerprint", "unknown"))
            shutil.rmtree(stale, ignore_errors=True)
            shutil.move(self.run.root, stale)
            changed = config_mod.changed_keys(old.get("section", {}), self.settings.section) or ["(no record)"]
            print(
                f"{self.task.label}: {self.run.root} was trained under other settings ({'; '.join(changed)}); "
                f"moved to {stale}, training from scratch",
                file=sys.stderr,
            )
        devices.barrier(self.runtime)

    def _start(self) -> None:
        """Run folder, log, seed, model (restored from ``state.pt`` if any), DDP and AMP."""
        if self.runtime.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.run.config, self.settings.config_text)
        self.log = make_logger(self.run.log, self.task.label.replace(" ", ""), self.runtime.is_main)
        backend = self.settings.tracking if self.runtime.is_main else tracking_mod.Tracking()  # rank 0 reports
        self.tracker = tracking_mod.tracker(self.run, backend, self.task.label)
        self.tracker.start(self.settings.config_text)
        checkpoints.seed_everything(self.settings.seed, self.settings.deterministic)
        self.log.info("%s on %s", self.task.label, devices.describe_device(self.runtime.device))
        self.cpu_bf16 = self._cpu_bf16()
        model = self.task.build_model(self.log).to(self.runtime.device)
        model = devices.in_memory_format(model, self.task.precision.channels_last)
        if self.run.state.exists():
            self.state = checkpoints.load_checkpoint(self.run.state)
            self.done, self.history, self.best = self.state["done"], self.state["history"], self.state["best"]
            model.load_state_dict(self.state["model"])
            self.log.info("resuming %s after epoch %d of %d", self.task.label, self.done, len(self.plan))
        net = devices.wrap_ddp(model, self.runtime, self.task.precision.sync_bn)
        self.model = devices.unwrap(net)  # the module DDP wraps (SyncBatchNorm conversion may replace it)
        self.net = devices.compiled(net, self.settings.compile)
        fp16 = self.runtime.device.type == "cuda" and self.task.precision.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        decay = self.task.averaging.ema_decay
        self.ema = Ema(self.model, decay) if decay else None
        if self.ema is not None and self.state is not None and self.state.get("ema") is not None:
            self.ema.load_state_dict(self.state["ema"])
        self.top = self.state.get("top", []) if self.state is not None else []  # [score, epoch] of the k best

    def _cpu_bf16(self) -> bool:
        """Whether the training steps run under bf16 autocast on CPU: where ``cpu_bf16`` asks and the CPU computes
        bf16 natively. Elsewhere oneDNN emulates it, slower than fp32, so the run trains in fp32 and says so."""
        if self.runtime.device.type != "cpu" or not self.task.precision.cpu_bf16:
            return False
        if devices.cpu_has_native_bf16() is False:
            self.log.warning(
                "cpu_bf16: this CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated, slower)"
                ": training in fp32"
            )
            return False
        self.log.info("cpu_bf16: training steps under bf16 autocast")
        return True

    def _start_stage(self, p: int, step: int) -> None:
        """A new optimiser, schedule, SWA average and loaders; on resume, their saved states."""
        stage = self.task.stages[p]
        self.opt = optimizer_for(self.model.parameters(), stage.lr, stage.weight_decay)
        self.sched = scheduler_for(self.opt, stage)
        self.swa = AveragedModel(self.model) if stage.swa_epochs else None
        if self.state is not None and step == self.done:  # resuming: continue exactly where the run stopped
            stage = self.state.get("stage", self.state.get("phase"))  # older state.pt files say "phase"
            if stage == p and self.plan[step][1] > 0:
                self.opt.load_state_dict(self.state["optimizer"])
                self.sched.load_state_dict(self.state["scheduler"])
                if self.swa is not None and self.state.get("swa") is not None:
                    self.swa.load_state_dict(self.state["swa"])
                restore_scaler(self.scaler, self.state["scaler"])
            checkpoints.set_rng_state(self.state["rng"])
        self.loader, self.sampler = self.task.loaders(p, self.runtime)
        self.stage_index = p

    def _epoch(self, step: int, stops: bool = False) -> None:
        """One epoch of the plan; ``stops``: the last this call runs (``max_epochs``), so its curves are drawn."""
        p, e = self.plan[step]
        if p != self.stage_index:
            self._start_stage(p, step)
        stage = self.task.stages[p]
        self.sampler.set_epoch(e)
        in_swa = self.swa is not None and e >= stage.epochs - stage.swa_epochs
        if in_swa and stage.swa_lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = stage.swa_lr
        lr = self.opt.param_groups[0]["lr"]
        self.frozen = self._frozen_parameters(stage, e)
        started = time.time()
        train_loss = self._train_epoch(f"{self.task.label} stage {p} epoch {e + 1}/{stage.epochs}", stage.accumulate)
        if in_swa:
            self.swa.update_parameters(self.model)
        stage_ends = e == stage.epochs - 1
        validates = stage_ends or (e + 1) % stage.validate_every == 0
        scores = self.task.validate(self.model, p, self.runtime) if validates else {}  # the same on every rank
        if stage.scheduler == "plateau":
            self.sched.step(self.task.monitor(scores))
        elif not (in_swa and stage.swa_lr is not None):
            self.sched.step()
        row = {"epoch": step + 1, "stage": p, "size": stage.size, "kind": "epoch", "lr": lr}
        self._record({**row, "train_loss": train_loss, **scores, "seconds": round(time.time() - started, 2)})
        self._save_weights(p, scores, stage_ends)
        if stage_ends and self.swa is not None:
            self._finish_swa(p, row)
        self._save_state(step, p, draw=stops or step + 1 == len(self.plan))

    def _train_epoch(self, desc: str, accumulate: int) -> float:
        """One pass over the training loader, an optimiser step every ``accumulate`` batches (the last group
        of an epoch may be shorter); the mean loss over every rank's images."""
        self.net.train()
        runtime, n = self.runtime, len(self.loader)
        total = torch.zeros((), device=runtime.device)  # summed on the device: no host sync per step
        count = torch.zeros((), device=runtime.device)
        self.opt.zero_grad(set_to_none=True)
        shown = self.progress and runtime.is_main and progress_bars.is_terminal()  # in a log, the epoch's line suffices
        for i, (inputs, targets) in enumerate(progress_bars.bar(self.loader, desc, shown, unit="batch")):
            group = accumulate if i < n - n % accumulate else n % accumulate  # batches in this step's group
            last = (i + 1) % accumulate == 0 or i + 1 == n
            loss, size = self._backward(inputs, targets, group, sync=last)
            if last:
                self._step()
            total += loss * size
            count += size
        return devices.mean_over_ranks(total, count, runtime)

    def _backward(self, inputs: Any, targets: Any, group: int, sync: bool) -> tuple[torch.Tensor, int]:
        """Forward and backward of one batch, its loss weighted by 1/``group``; DDP averages gradients over
        the ranks only on the group's last batch."""
        precision, device = self.task.precision, self.runtime.device
        x = datasets.model_input(inputs, self.settings.channels, device, precision.channels_last)
        y = datasets.model_target(targets, device)
        quiet = getattr(self.net, "no_sync", None)
        with contextlib.nullcontext() if sync or quiet is None else quiet():
            with devices.autocast(device, precision.amp, self.cpu_bf16):
                outputs = self.net(x)
            loss = self.task.loss(outputs.float(), y)
            self.scaler.scale(loss / group).backward()
        return loss.detach(), len(x)

    def _frozen_parameters(self, stage: StageConfig, epoch: int) -> list[nn.Parameter]:
        """The encoder's parameters during a stage's first ``freeze_encoder_epochs`` epochs (the 1st place's
        uptraining at 1024), else none. Their gradients are dropped before each step, so the optimiser leaves
        them (and its state of them) as they are; under DDP every rank drops the same ones."""
        if epoch >= stage.freeze_encoder_epochs:
            return []
        encoder = getattr(self.model, "encoder", None)
        if encoder is None:
            raise config_mod.ConfigError(f"{self.task.label}: freeze_encoder_epochs needs a model with an encoder")
        return list(encoder.parameters())

    def _step(self) -> None:
        """Clip (if asked), step the optimiser through the gradient scaler, and clear the gradients."""
        for param in self.frozen:
            param.grad = None
        if self.task.precision.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.task.precision.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self._after_step()

    def _after_step(self) -> None:
        """After every optimiser step: the EMA of the weights, when asked."""
        if self.ema is not None:
            self.ema.update(self.model)

    def _record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        self.tracker.log(row)
        scores = " ".join(f"{key} {row[key]:.4f}" for key in self.task.log_keys if key in row)
        what = "SWA weights" if row["kind"] == "swa" else f"loss {row['train_loss']:.4f}"
        self.log.info(
            "%s epoch %d/%d (stage %d, %dpx): %s %s lr %.2e",
            self.task.label,
            row["epoch"],
            len(self.plan),
            row["stage"],
            row["size"],
            what,
            scores,
            row["lr"],
        )

    def _save_weights(self, p: int, scores: dict[str, float], stage_ends: bool) -> None:
        """``best.pt`` when the task's selection score improves; ``last.pt`` (and ``ema.pt``) at each stage's end.

        Not ``last.pt`` every epoch: ``state.pt`` already holds those weights for a resume, and on small epochs
        (the demo, the tests) the extra writes were a tenth of the training time."""
        if not self.runtime.is_main:
            return
        score = self.task.monitor(scores) if scores else float("-inf")  # an epoch without validation
        if p >= self.task.select_from and score > self.best:
            self.best = score
            checkpoints.save_checkpoint(self.run.weights("best"), checkpoints.cpu_state(self.model))
        if stage_ends:
            checkpoints.save_checkpoint(self.run.weights("last"), checkpoints.cpu_state(self.model))
        if stage_ends and self.ema is not None:
            checkpoints.save_checkpoint(self.run.weights("ema"), checkpoints.cpu_state(self.ema.module))
        if p >= self.task.select_from and self.task.averaging.top_k and scores:
            self._keep_top(score, len(self.history))

    def _keep_top(self, score: float, epoch: int) -> None:
        """Keep this epoch's weights when they are among the k best so far; drop the one they displace."""
        k = self.task.averaging.top_k
        ranked = sorted([*self.top, [score, epoch]], key=lambda t: -t[0])
        if [score, epoch] not in ranked[:k]:
            return
        checkpoints.save_checkpoint(self.run.weights(f"top-e{epoch}"), checkpoints.cpu_state(self.model))
        for _, dropped in ranked[k:]:
            self.run.weights(f"top-e{dropped}").unlink(missing_ok=True)
        self.top = ranked[:k]

    def _average_top(self) -> None:
        """``topk.pt``: the mean of the k best epochs' weights (integer buffers from the best one)."""
        states = [checkpoints.load_checkpoint(self.run.weights(f"top-e{epoch}")) for _, epoch in self.top]
        mean = {}
        for key, first in states[0].items():
            stacked = torch.stack([s[key] for s in states])
            mean[key] = stacked.float().mean(0).to(first.dtype) if first.is_floating_point() else first
        checkpoints.save_checkpoint(self.run.weights("topk"), mean)

    def _finish_swa(self, p: int, row: dict[str, Any]) -> None:
        """Batch-norm statistics for the averaged weights, their validation, ``swa.pt``; the next stage starts
        from them."""
        precision = self.task.precision
        update_bn(
            self.swa.module,
            self.task.bn_loader(p, self.runtime),
            self.runtime,
            precision.amp,
            self.settings.channels,
            precision.channels_last,
        )
        scores = self.task.validate(self.swa.module, p, self.runtime)
        self._record({**row, "kind": "swa", "train_loss": float("nan"), **scores, "seconds": 0.0})
        if self.runtime.is_main:
            name = "swa" if p == len(self.task.stages) - 1 else f"swa_stage{p}"
            checkpoints.save_checkpoint(self.run.weights(name), checkpoints.cpu_state(self.swa.module))
        self.model.load_state_dict(self.swa.module.state_dict())

    def _save_state(self, step: int, p: int, draw: bool) -> None:
        """The resume point and metrics after every epoch (rank 0); every rank waits for it. ``curves.png`` is
        drawn when ``draw`` (the last epoch, or the last of a stopped call) or when the last drawing is
        ``CURVES_EVERY_S`` old: matplotlib takes about half a second a drawing, as long as a small epoch."""
        if self.runtime.is_main:
            state = {
                "done": step + 1,
                "stage": p,
                "history": self.history,
                "best": self.best,
                "model": checkpoints.cpu_state(self.model),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "swa": self.swa.state_dict() if self.swa is not None else None,
                "scaler": self.scaler.state_dict(),
                "rng": checkpoints.rng_state(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "top": self.top,
                "meta": self.meta,
            }
            checkpoints.save_checkpoint(self.run.state, state)
            metrics = pd.DataFrame(self.history)
            atomic.write_csv(self.run.metrics, metrics)
            if draw or time.monotonic() - self.curves_drawn >= CURVES_EVERY_S:
                plots.plot_curves(metrics, self.run.curves, self.task.curves)
                self.curves_drawn = time.monotonic()
        devices.barrier(self.runtime)

    def _finish(self) -> dict[str, Any]:
        """The task's out-of-fold output, ``metrics.json``, then ``model.pt`` with its metadata (rank 0)."""
        summary: dict[str, Any] = {"epochs": len(self.plan)}
        if self.runtime.is_main:
            if self.top:
                self._average_top()
            extra, weights = self.task.finish(self.run, self.runtime, self.progress)
            summary.update(extra, weights=weights)
            atomic.write_json(self.run.summary, summary)
            atomic.write_json(self.run.trained_under, self.settings.section)
            state = checkpoints.load_checkpoint(self.run.weights(weights))
            checkpoints.save_checkpoint(
                self.run.model, {"state_dict": state, "meta": {**self.meta, "summary": summary}}
            )
            self.tracker.finish(summary)
            self.log.info("%s done: %s", self.task.label, summary)
        devices.barrier(self.runtime)
        return summary


def settings_for(
    cfg: config_mod.Config,
    section: str,
    seed: int,
    split: str,
    train_inputs: str | None = None,
    models_dir: Path | None = None,
) -> Settings:
    """The settings of a run of config section ``section`` (``segmentation`` or ``classifier``) on ``split``
    (a hash of the images it trains and validates on: a changed split is a changed run) and, for a fold,
    ``train_inputs`` (the training inputs' manifest hash: a replaced training DICOM is a changed run too).
    MLflow's default store is ``<models_dir>/mlruns``, shared by the experiments there."""
    values = {**freshness.section(cfg, section), "split": split}
    if train_inputs is not None:
        values["train_inputs"] = train_inputs
    store = cfg.logging.mlflow_uri or ((models_dir or Path("models")) / "mlruns").resolve().as_uri()
    tracking = tracking_mod.Tracking(cfg.logging.backend, store, cfg.name)
    return Settings(seed, cfg.deterministic, cfg.compile, cfg.data.channels, values, config_mod.dump(cfg), tracking)


@dataclass(frozen=True)
class FoldJob:
    """One fold of one experiment on one processed folder (checked before any work)."""

    cfg: config_mod.Config
    fold: int
    processed: ProcessedDir
    exp: ExperimentDir

    @classmethod
    def of(cls, cfg: config_mod.Config, fold: int, processed: Any, exp: Any) -> FoldJob:
        """From paths or folder objects; a fold outside the config's folds fails at once."""
        check_fold(cfg, fold)
        processed = processed if isinstance(processed, ProcessedDir) else ProcessedDir(Path(processed))
        exp = exp if isinstance(exp, ExperimentDir) else ExperimentDir(Path(exp), cfg.final_size)
        return cls(cfg, fold, processed, exp)


def fit_fold(job: FoldJob, section: str, task: Task, run: RunDir, seed: int, **options: Any) -> dict[str, Any]:
    """Train ``task`` into ``run`` under the settings of config ``section`` and the fold's split.

    ``options``: ``device`` (cpu or cuda; default CUDA when usable), ``progress``, ``max_epochs``.
    """
    split = folds_mod.split_hash(pd.read_csv(job.exp.folds, dtype={"image_id": str}), job.fold)
    settings = settings_for(job.cfg, section, seed, split, manifest.digest(job.processed.root), job.exp.root.parent)
    with devices.running(options.pop("device", None)) as runtime:
        devices.check_batches(job.cfg, runtime.world_size)
        return Trainer(task, run, settings, runtime, **options).fit()


def check_fold(cfg: config_mod.Config, fold: int) -> None:
    """Fail before any work when ``fold`` is not one of the config's folds."""
    if not 0 <= fold < cfg.data.n_folds:
        raise config_mod.ConfigError(
            f"fold {fold} is not a fold of {cfg.name}, whose data.n_folds is {cfg.data.n_folds}: "
            f"use 0 to {cfg.data.n_folds - 1}"
        )
