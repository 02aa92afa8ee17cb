"""Experiment tracking: each run's ``metrics.csv`` rows, its config and its final scores, also sent to TensorBoard
or MLflow when ``logging.backend`` says so (``csv``, the default, is ``metrics.csv`` alone).

``tensorboard``: an event file per run in ``<run>/tensorboard/`` (``tensorboard --logdir models/``).
``mlflow``: a run per training run in the experiment named after the config, in the store
``logging.mlflow_uri`` (default: the local file store ``models/mlruns``; ``mlflow ui
--backend-store-uri models/mlruns``); a resumed run logs into the same MLflow run. Both are optional
packages (``pip install 'pneumothorax[track]'``); asking for one that is not installed fails when
the run starts, before any training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from pneumothorax.io import atomic
from pneumothorax.io.errors import PipelineError
from pneumothorax.io.paths import RunDir


class TrackingError(PipelineError, RuntimeError):
    """A tracking backend that cannot start (its package missing); the message says what to install."""


@dataclass(frozen=True)
class Tracking:
    """Where a run's metrics go besides ``metrics.csv``."""

    backend: str = "csv"  # csv | tensorboard | mlflow
    uri: str = ""  # MLflow tracking URI (settings_for fills in the default store)
    experiment: str = "pneumothorax"  # MLflow experiment name (the config's)


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of a row (MLflow and TensorBoard take numbers only)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _tags(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as tags: an epoch's values by their names, the SWA weights' validation under ``swa/``."""
    prefix = "swa/" if row.get("kind") == "swa" else ""
    skip = ("epoch", "stage", "size") if prefix else ("epoch",)
    return {prefix + key: value for key, value in _numbers(row).items() if key not in skip}


class CsvTracker:
    """``metrics.csv`` alone (the trainer writes it): nothing more to send."""

    def __init__(self, run: RunDir, tracking: Tracking, label: str) -> None:
        self.run, self.tracking, self.label = run, tracking, label

    def start(self, config_text: str) -> None:
        """The run (re)starts under this config."""

    def log(self, row: dict[str, Any]) -> None:
        """One row of ``metrics.csv``."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's final scores."""


class TensorBoardTracker(CsvTracker):
    """Scalars per epoch, the config as text, the final scores under ``final/``."""

    def start(self, config_text: str) -> None:
        try:  # an optional package: imported only when asked for
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackingError(
                f"logging.backend tensorboard needs the tensorboard package ({exc}): pip install 'pneumothorax[track]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(self.run.tensorboard))
        self.writer.add_text("config", f"```\n{config_text}\n```")

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in _tags(row).items():
            self.writer.add_scalar(tag, value, int(row["epoch"]))
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in _numbers(summary).items():
            self.writer.add_scalar(f"final/{key}", value, 0)
        self.writer.close()


class MlflowTracker(CsvTracker):
    """A run in the MLflow store: metrics per epoch, the config as an artifact, the final scores."""

    def start(self, config_text: str) -> None:
        try:  # an optional package: imported only when asked for
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackingError(
                f"logging.backend mlflow needs the mlflow package ({exc}): pip install 'pneumothorax[track]'"
            ) from None
        uri = self.tracking.uri
        if uri.startswith("file:"):  # MLflow 3 keeps its file store only on request; it needs no database package
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(self.tracking.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(self.tracking.experiment)
        id_file = self.run.mlflow_run_id
        if id_file.exists():  # a resumed run goes on logging into its MLflow run
            self.run_id = id_file.read_text().strip()
        else:
            self.run_id = self.client.create_run(experiment, run_name=self.label).info.run_id
            atomic.write_text(id_file, self.run_id)
        self.client.log_text(self.run_id, config_text, "config.yaml")

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in _tags(row).items():
            self.client.log_metric(self.run_id, tag, value, step=int(row["epoch"]))

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in _numbers(summary).items():
            self.client.log_metric(self.run_id, f"final/{key}", value)
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, type[CsvTracker]] = {"csv": CsvTracker, "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


def tracker(run: RunDir, tracking: Tracking, label: str) -> CsvTracker:
    """The tracker ``tracking.backend`` names (the config checks the name: see ``LoggingConfig``)."""
    return TRACKERS[tracking.backend](run, tracking, label)
