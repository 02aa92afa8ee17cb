"""``make kaggle-submit``: send a validated submission to the competition with the official ``kaggle`` CLI.

The CSV is validated again first (every test id once, in the sample's set, every RLE decodable), so
nothing broken leaves the machine. The CLI is an optional dependency (``pip install
'pneumothorax[kaggle]'``; ``make install`` puts it in ``.venv``); its credentials are the user's
(``~/.kaggle/kaggle.json``, ``$KAGGLE_CONFIG_DIR/kaggle.json``, or ``KAGGLE_USERNAME`` and
``KAGGLE_KEY``, or an access token in ``KAGGLE_API_TOKEN``). Either missing is a one-line error
that says how to get it, before anything is sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from pneumothorax.data import prepared
from pneumothorax.io.errors import PipelineError
from pneumothorax.post import submission

COMPETITION = "siim-acr-pneumothorax-segmentation"


class KaggleError(PipelineError, RuntimeError):
    """The CLI or its credentials are missing, or the upload failed; the message says what to do."""


def credentials(env: Mapping[str, str]) -> str | None:
    """Where the Kaggle credentials come from (None: nowhere)."""
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME and KAGGLE_KEY"
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    folder = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else Path(env.get("HOME", "~")) / ".kaggle"
    for name in ("kaggle.json", "access_token"):
        if (folder.expanduser() / name).is_file():
            return str(folder / name)
    return None


def command(cli: str, csv: Path, message: str) -> list[str]:
    """The CLI call that submits ``csv`` to the competition."""
    return [cli, "competitions", "submit", "-c", COMPETITION, "-f", str(csv), "-m", message]


def submit(csv: Path, message: str, processed: Path, cli: str = "kaggle", env: Mapping[str, str] | None = None) -> None:
    """Validate ``csv`` against the prepared test set, then submit it with the ``kaggle`` CLI.

    Raises:
        SubmissionError: the CSV is not a valid submission (names the row or id).
        KaggleError: no message, no CLI, no credentials, or the CLI failed.
    """
    env = dict(os.environ if env is None else env)
    if not message.strip():
        raise KaggleError("say what this submission is: make kaggle-submit EXP=<exp> MSG='<message>'")
    expected, sample = prepared.expected_test_ids(processed)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    submission.validate(frame, expected, f"the sample submission {sample}" if sample else "the prepared test set")
    found = shutil.which(cli, path=env.get("PATH"))
    if found is None:
        raise KaggleError(
            f"the kaggle CLI ({cli}) is not installed: pip install 'pneumothorax[kaggle]' "
            "(make install puts it in .venv)"
        )
    if credentials(env) is None:
        raise KaggleError(
            "no Kaggle credentials: create an API token at https://www.kaggle.com/settings (Account, API), save "
            "kaggle.json to ~/.kaggle/ (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY; accept the competition's "
            f"rules at https://www.kaggle.com/c/{COMPETITION} first"
        )
    done = subprocess.run(command(found, csv, message), env=env)
    if done.returncode:
        raise KaggleError(f"{found} competitions submit failed (exit {done.returncode}); its message is above")
