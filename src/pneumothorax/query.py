"""The Makefile's questions, answered without importing torch (a fraction of a second each).

``python -m pneumothorax.query get KEY --config NAME``: a config value (lists space-separated,
booleans as 1 or nothing). ``deps --config NAME``: the YAML files the experiment reads.
``stamps --config NAME --exp-dir models/NAME --processed P``: write ``stamps/<section>.json`` for
every config section (:data:`pneumothorax.config.SECTIONS`) whose resolved value changed, so that
Make reruns exactly the steps that read it, and each training run's own copy of its section
(``stamps/segmentation-fold0.json``); the folds' stamp and each fold's hold the training inputs'
hash from ``P/inputs-train.json`` too (see :func:`_write_stamp`); ``stamps/inputs.json`` and
``stamps/test-inputs.json`` are the experiment's record of the manifests prepare and infer read.
``ensemble --exp-dir models/NAME --members "a b" --weights W``: ``stamps/ensemble.json``, the
ensemble's members and weight mode (see :func:`_ensemble_stamp`).
``manifest --data-dir D --processed P [--train-csv ...]``: find the data layout and write the
input manifests ``P/inputs-train.json`` and ``P/inputs-test.json`` where they changed; on a
layout error, print it and leave them (Make then stops every step that reads the data).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from . import config as config_mod
from . import files, manifest, paths
from . import layout as layout_mod


def _get(name: str, key: str) -> str:
    value: Any = config_mod.to_dict(config_mod.load(name))
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else ""
    return str(value)


def _manifest(args: argparse.Namespace) -> int:
    processed = Path(args.processed)
    try:
        found = layout_mod.detect(
            args.data_dir,
            args.train_csv,
            args.train_dir.split(),
            args.test_dir,
            args.sample_submission,
            args.patient_map,
        )
        manifest.update(found, processed)
    except (layout_mod.LayoutError, OSError) as exc:
        # the last good layout's manifests stay (Make stops every step that reads the data on this
        # error), so the corrected command finds its inputs unchanged and reruns nothing
        print(str(exc).replace("\n", " "))
        return 2
    return 0


def _text(values: dict[str, Any]) -> str:
    """A stamp's content: the values as JSON, keys sorted (so equal values are equal texts)."""
    return json.dumps(values, indent=1, sort_keys=True) + "\n"


def _stamp_text(cfg: config_mod.Config, name: str, train_inputs: str | None) -> str:
    """A step's stamp: its section and, for the folds and each fold's training run (whose fingerprint
    holds it), the training inputs' hash (:func:`pneumothorax.manifest.digest`)."""
    values = config_mod.section(cfg, name)
    if train_inputs is not None:
        values["train_inputs"] = train_inputs
    return _text(values)


def _trained_text(run: paths.RunDir, name: str) -> str | None:
    """A finished run's stamp as it was trained (``trained_under.json``, less the split, which Make
    follows as folds.csv; for older runs the section of the config saved beside the model), or None."""
    try:
        if run.trained_under.exists():
            values = json.loads(run.trained_under.read_text())
            return _text({k: v for k, v in values.items() if k != "split"})
        return _stamp_text(config_mod.from_yaml(run.config.read_text()), name, None) if run.config.exists() else None
    except (config_mod.ConfigError, yaml.YAMLError, ValueError):  # an older schema: the run's script decides
        return None


def _write_stamp(stamp: Path, text: str, built: Path, built_under: Callable[[], str | None]) -> None:
    """A stamp, rewritten when its value changes. A stamp newer than ``built`` that holds the values
    ``built`` was made under takes ``built``'s time: an edit reverted, one that only a ``make -n`` saw,
    or a step that ran and kept its output as it was (a folds edit or new inputs that leave the split).
    The step is up to date, and Make neither plans it nor invokes its script as a no-op forever.
    ``built_under`` (called only when ``built`` exists) reads that record only then, not at every ``make``."""
    files.write_text_if_changed(stamp, text)
    if not built.exists():
        return
    made = built.stat().st_mtime_ns
    if stamp.stat().st_mtime_ns > made and built_under() == text:
        os.utime(stamp, ns=(made, made))


def _write_inputs_stamp(exp: paths.ExperimentDir, name: str, processed: Path, hashes: dict[str, str]) -> None:
    """A step's inputs stamp (:data:`pneumothorax.manifest.STEP_INPUTS`), kept as a config stamp is: set
    back to the manifests the step last ran under (a test folder that only a ``make -n`` saw), it takes
    that run's time (``stamps/<name>.made``). Created, it takes the manifests' own time, which is what
    Make compared before these stamps existed: an experiment prepared before them reruns nothing."""
    stamp, made = exp.stamp(name), exp.made(name)
    created = not stamp.exists()
    splits = manifest.STEP_INPUTS[name]
    _write_stamp(stamp, _text({split: hashes[split] for split in splits}), made, made.read_text)
    newest = manifest.newest_time(processed, splits) if created else None
    if newest is not None:
        os.utime(stamp, ns=(newest, newest))


def _stamps(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(str(exc).replace("\n", " "))
        return 2
    exp = paths.ExperimentDir(Path(args.exp_dir), cfg.final_size)
    processed = Path(args.processed)
    train_inputs = manifest.digest(processed)
    exp.stamp("prepare").parent.mkdir(parents=True, exist_ok=True)
    hashes = manifest.hashes(processed)  # each manifest read once, whichever steps' stamps hold it
    for name in manifest.STEP_INPUTS:
        _write_inputs_stamp(exp, name, processed, hashes)
    # each step's Make recipe copies its stamp into stamps/<section>.made, timed as its output (the
    # folds' stamp holds the training inputs it split too); no step makes classifier.made or
    # segmentation.made: the training runs have their own stamps, below
    for name in config_mod.SECTIONS:
        text = _stamp_text(cfg, name, train_inputs if name == "folds" else None)
        made = exp.made(name)
        _write_stamp(exp.stamp(name), text, made, made.read_text)
    for name, run in exp.training_runs(cfg.data.n_folds):
        text = _stamp_text(cfg, name, None if run == exp.pretrain else train_inputs)
        _write_stamp(exp.run_stamp(name, run), text, run.model, functools.partial(_trained_text, run, name))
    return 0


def _ensemble_text(members: list[str], weights: str | None) -> str:
    return _text({"members": members, "weights": weights})


def _ensemble_stamp(args: argparse.Namespace) -> int:
    """``stamps/ensemble.json`` of ensemble ``--exp-dir``: its members and weight mode, rewritten when
    they change (another member list or ``WEIGHTS`` rebuilds it under the same NAME); set back to what
    ``ensemble.json`` was built from, it takes that file's time."""
    exp = paths.ExperimentDir(Path(args.exp_dir))

    def built_under() -> str | None:
        try:
            record = json.loads(exp.ensemble.read_text())
        except ValueError:
            return None
        return _ensemble_text([m["experiment"] for m in record.get("members", [])], record.get("weights_mode"))

    exp.stamp("ensemble").parent.mkdir(parents=True, exist_ok=True)
    _write_stamp(exp.stamp("ensemble"), _ensemble_text(args.members.split(), args.weights), exp.ensemble, built_under)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``get KEY``, ``deps``, ``manifest``, ``stamps`` or ``ensemble``."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("command", choices=["get", "deps", "manifest", "stamps", "ensemble"])
    p.add_argument("--members", default="", help="ensemble: the member experiments, space-separated")
    p.add_argument("--weights", default="equal", help="ensemble: equal or search")
    p.add_argument("--exp-dir")
    p.add_argument("key", nargs="?")
    p.add_argument("--config")
    p.add_argument("--data-dir")
    p.add_argument("--processed", help="stamps, manifest: the processed folder (its input manifests)")
    p.add_argument("--train-csv", default=None)
    p.add_argument("--train-dir", default="")
    p.add_argument("--test-dir", default=None)
    p.add_argument("--sample-submission", default=None)
    p.add_argument("--patient-map", default=None)
    args = p.parse_args(argv)
    if args.command == "manifest":
        return _manifest(args)
    if args.command == "stamps":
        if not args.processed:
            p.error("stamps needs --processed (the input manifests)")
        return _stamps(args)
    if args.command == "ensemble":
        return _ensemble_stamp(args)
    if args.command == "deps":
        print(" ".join(os.path.relpath(f, Path.cwd()) for f in config_mod.sources(args.config)))
        return 0
    print(_get(args.config, args.key or ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
