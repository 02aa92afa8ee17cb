"""The Makefile's one question at parse time, answered as Make assignments: what this run's steps need to know.

``python -m pneumothorax.pipeline.make_plan --config EXP [--set KEY=VALUE ...] --exp-dir models/EXP
--processed P --data-dir D [layout overrides]`` prints, one per line:

- ``N_FOLDS``, ``CLS_ENABLED`` (1 or nothing), ``ENC_INIT``, ``EXTERNAL_CSV``: the experiment's folds, gate,
  encoder initialisation and external pre-training set (which rules exist);
- ``STALE``: the outputs that exist but were made under other values than now, relative to the experiment
  folder (:func:`pneumothorax.io.freshness.stale_outputs`); the Makefile makes them depend on ``FORCE``;
- ``LAYOUT_ERROR``: why the data layout was not found (only the steps that read the data stop on it; the
  others compare against the manifests ``prepare`` last wrote);
- ``PLAN_ERROR``: a config that does not load (Make stops at once).

With ``--ensemble-dir models/NAME --members "a b" --weights W`` it adds ``ENSEMBLE_STALE`` (1 when that
ensemble was built from other members or weights). It writes nothing, so ``make -n`` only looks; it imports
no torch and starts in a fraction of a second. Lines are joined with ``|NL|`` (Make's ``$(shell)`` would
turn newlines into spaces); ``$`` and ``#`` are escaped for ``$(eval)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumothorax.io import config as config_mod
from pneumothorax.io import freshness, manifest
from pneumothorax.io import layout as layout_mod
from pneumothorax.io.errors import PipelineError
from pneumothorax.io.paths import ExperimentDir

SEPARATOR = "|NL|"


def _assign(name: str, value: str) -> str:
    escaped = str(value).replace("\n", " ").replace("$", "$$").replace("#", "\\#")
    return f"{name} := {escaped}"


def current_inputs(args: argparse.Namespace) -> tuple[freshness.Inputs, str]:
    """The inputs the data holds now (built from ``--data-dir`` in memory), and the layout error if there is one
    (then the inputs are the manifests ``prepare`` last wrote)."""
    processed = Path(args.processed)
    if not args.data_dir:
        return freshness.Inputs.of_processed(processed), ""
    try:
        found = layout_mod.detect(
            args.data_dir,
            args.train_csv,
            args.train_dir.split(),
            args.test_dir,
            args.sample_submission,
            args.patient_map,
            args.extra_dir,
        )
        return freshness.Inputs.of_manifests(manifest.build(found)), ""
    except (layout_mod.LayoutError, OSError) as exc:
        return freshness.Inputs.of_processed(processed), str(exc)


def experiment_lines(args: argparse.Namespace) -> list[str]:
    """What Make needs of the experiment: its shape and its out-of-date outputs."""
    cfg = config_mod.load(args.config, args.overrides)
    exp = ExperimentDir(Path(args.exp_dir), cfg.final_size)
    inputs, layout_error = current_inputs(args)
    stale = [str(path.relative_to(exp.root)) for path in freshness.stale_outputs(exp, cfg, inputs)]
    external = cfg.classifier.external_csv
    return [
        _assign("N_FOLDS", str(cfg.data.n_folds)),
        _assign("CLS_ENABLED", "1" if cfg.classifier.enabled else ""),
        _assign("ENC_INIT", cfg.segmentation.encoder_init),
        _assign("EXTERNAL_CSV", "" if external == "none" else external),
        _assign("STALE", " ".join(stale)),
        _assign("LAYOUT_ERROR", layout_error),
    ]


def plan(args: argparse.Namespace) -> list[str]:
    """Every line of the answer (a config error becomes ``PLAN_ERROR``)."""
    lines = []
    try:
        if args.config:
            lines += experiment_lines(args)
        if args.ensemble_dir:
            exp = ExperimentDir(Path(args.ensemble_dir))
            stale = freshness.ensemble_is_stale(exp, args.members.split(), args.weights)
            lines.append(_assign("ENSEMBLE_STALE", "1" if stale else ""))
    except PipelineError as exc:
        lines.append(_assign("PLAN_ERROR", str(exc)))
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--exp-dir", default=None, help="models/<exp>")
    p.add_argument("--processed", default="", help="the processed folder (the manifests prepare wrote)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-csv", default=None)
    p.add_argument("--train-dir", default="", help="training folders, space-separated")
    p.add_argument("--test-dir", default=None)
    p.add_argument("--sample-submission", default=None)
    p.add_argument("--patient-map", default=None)
    p.add_argument("--extra-dir", default=None)
    p.add_argument("--ensemble-dir", default=None, help="models/<NAME> of an ensemble")
    p.add_argument("--members", default="", help="the ensemble's members, space-separated")
    p.add_argument("--weights", default="equal", help="the ensemble's weight mode")
    return p


def main(argv: list[str] | None = None) -> int:
    print(SEPARATOR.join(plan(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
