"""Shared command-line plumbing for ``scripts/``: arguments, config loading, one-line errors.

The Makefile's own question at parse time lives in :mod:`pneumothorax.pipeline.make_plan`, which imports
no torch and starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pneumothorax.io import config as config_mod
from pneumothorax.io import freshness
from pneumothorax.io.errors import PipelineError
from pneumothorax.io.paths import ExperimentDir


def parser(description: str, config: bool = True, step: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser with ``--config`` and repeatable ``--set key=value`` overrides; a pipeline ``step``
    also takes its processed folder and experiment folder."""
    p = argparse.ArgumentParser(description=description)
    if step:
        p.add_argument("--processed", required=True, help="the processed folder (data/processed/<data>)")
        p.add_argument("--exp-dir", required=True, help="the experiment folder (models/<exp>)")
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


def record(step: str, cfg: config_mod.Config, exp: ExperimentDir, processed: str | Path) -> None:
    """What step ``step`` just made its output under (its last act: Make then finds it up to date)."""
    spec = freshness.STEPS[step]
    reads_inputs = spec.manifests or spec.train_digest
    freshness.record(exp, step, cfg, freshness.Inputs.of_processed(Path(processed)) if reads_inputs else None)


def no_models(cfg: config_mod.Config) -> None:
    """The check of a step that builds no model (prepare, folds, search, report): nothing to look up, and no
    torch, timm or smp to import (the step starts in a second instead of several)."""


def load_config(args: argparse.Namespace, check: Callable[[config_mod.Config], None]) -> config_mod.Config:
    """The experiment config from parsed args, passed to ``check`` (``models.check_names``: every model name
    against its registry, before any work; this module imports no torch, so the caller hands it over)."""
    cfg = config_mod.load(args.config, args.overrides)
    check(cfg)
    return cfg


def run(main: Any) -> None:
    """Run a script's main; a :class:`~pneumothorax.io.errors.PipelineError` (bad input, a step not run yet)
    prints one line naming the problem and exits 2; anything else is a bug and keeps its traceback.

    A script pauses the cyclic collector in its first lines, before its imports: torch, timm, pandas and
    sympy make millions of objects, which it would walk again and again (1.5-2 s of each start on 2
    cores, measured). Here they are frozen (they live as long as the process anyway, and no later
    collection walks them) and collection resumes for ``main``'s own work."""
    gc.freeze()
    gc.enable()
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        # The interpreter's last garbage collection at exit walks every object that torch, timm and sympy
        # made: 2-3 s of each script's run on 2 cores, to free memory the OS takes back anyway. Frozen
        # objects are skipped; atexit handlers and stream flushes still run.
        gc.freeze()
