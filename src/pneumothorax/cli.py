"""Shared command-line plumbing for ``scripts/``: arguments, config loading, one-line errors.

The Makefile's own queries (config values, input manifests) live in :mod:`pneumothorax.query`,
which imports no torch and starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import dicom, files, postprocess, prepare, rle, submission
from . import layout as layout_mod
from .errors import DeviceError, WeightsError
from .paths import ExperimentDir

KINDS = {
    "stage2": "stage 2 (today's download: stage_2_train.csv, stage_2_images/, stage-1 re-uploads for training)",
    "stage1": "stage 1 (train-rle.csv, dicom-images-train/, dicom-images-test/)",
    "custom": "custom (label CSV named by TRAIN_CSV)",
}


def parser(description: str, config: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser with ``--config`` and repeatable ``--set key=value`` overrides."""
    p = argparse.ArgumentParser(description=description)
    if config:
        p.add_argument("--config", required=True, help="experiment name (configs/NAME.yaml) or YAML path")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key (dotted; YAML value), repeatable",
        )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def experiment(cfg: config_mod.Config, exp_dir: str) -> ExperimentDir:
    """The experiment folder of ``cfg`` at ``exp_dir`` (``models/<exp>``)."""
    return ExperimentDir(Path(exp_dir), cfg.final_size)


def load_config(args: argparse.Namespace, check: Callable[[config_mod.Config], None]) -> config_mod.Config:
    """The experiment config from parsed args, passed to ``check`` (``models.check_names``: every model name
    against its registry, before any work; this module imports no torch, so the caller hands it over)."""
    cfg = config_mod.load(args.config, args.overrides)
    check(cfg)
    return cfg


def describe_layout(found: layout_mod.Layout) -> str:
    """What ``prepare`` is about to read, in a few lines."""
    rows, images = prepare.label_counts(found.labels)
    lines = [
        f"layout: {KINDS[found.kind]}",
        f"  labels: {found.labels} ({rows:,} rows, {images:,} images)",
        "  training DICOMs: every labelled .dcm under "
        + ", ".join(str(d) for d in found.train_dirs)
        + (f" except {found.test_dir}" if found.test_dir else ""),
        f"  test DICOMs: {found.test_dir}" if found.test_dir else "  test DICOMs: none (training-only run)",
    ]
    if found.sample_submission:
        lines.append(f"  sample submission: {found.sample_submission}")
    return "\n".join(lines)


ERRORS = (
    config_mod.ConfigError,
    layout_mod.LayoutError,
    rle.RLEError,
    dicom.DicomError,
    prepare.PrepareError,
    submission.SubmissionError,
    WeightsError,
    DeviceError,
    postprocess.PostProcessError,
    files.WriteError,
    FileNotFoundError,
)


def run(main: Any) -> None:
    """Run a script's main; known errors print one line naming the problem and exit 2."""
    try:
        main()
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
