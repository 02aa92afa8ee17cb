"""Shared command-line plumbing for ``scripts/`` and a tiny config query tool for the Makefile.

``python -m pneumothorax.cli get KEY --config NAME`` prints a config value (lists space-separated);
``python -m pneumothorax.cli deps --config NAME`` prints the YAML files the experiment reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from . import config as config_mod


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


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The experiment config from parsed args."""
    return config_mod.load(args.config, args.overrides)


def run(main: Any) -> None:
    """Run a script's main; known errors print one line naming the problem and exit 2."""
    from .dicom import DicomError
    from .models import WeightsError
    from .prepare import PrepareError
    from .rle import RLEError
    from .submission import SubmissionError

    try:
        main()
    except (
        config_mod.ConfigError,
        RLEError,
        DicomError,
        PrepareError,
        SubmissionError,
        WeightsError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _chain(path: Path, seen: list[Path]) -> list[Path]:
    data = yaml.safe_load(path.read_text()) or {}
    parents = data.get("defaults", None if path.stem == "base" else ["base"]) or []
    for parent in [parents] if isinstance(parents, str) else parents:
        _chain(config_mod.resolve_path(parent, path.parent), seen)
    if path not in seen:
        seen.append(path)
    return seen


def main(argv: list[str] | None = None) -> None:
    """``get KEY`` or ``deps`` for the Makefile."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("command", choices=["get", "deps"])
    p.add_argument("key", nargs="?")
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    if args.command == "deps":
        root = Path.cwd()
        print(" ".join(os.path.relpath(f, root) for f in _chain(config_mod.resolve_path(args.config), [])))
        return
    value: Any = config_mod.to_dict(config_mod.load(args.config))
    for part in (args.key or "").split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    if isinstance(value, list):
        print(" ".join(str(v) for v in value))
    elif isinstance(value, bool):
        print("1" if value else "")
    else:
        print(value)


if __name__ == "__main__":
    main()
