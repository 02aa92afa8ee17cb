"""make kaggle-submit: the CSV validated again, then the official CLI called with the competition, file and message."""

from __future__ import annotations

import json
import os
import stat

import pytest

from pneumothorax.io import paths
from pneumothorax.pipeline import kaggle
from pneumothorax.post.submission import SubmissionError

IDS = ["ID_a", "ID_b", "ID_c"]


@pytest.fixture()
def prepared(tmp_path):
    """A processed folder whose test set is IDS (no sample submission), and a valid submission of it."""
    processed = tmp_path / "p"
    processed.mkdir()
    record = {"version": 2, "sizes": [64], "layout": {"sample_submission": "none"}, "splits": {"test": {"ids": IDS}}}
    paths.ProcessedDir(processed).record.write_text(json.dumps(record))
    csv = tmp_path / "sub.csv"
    csv.write_text("ImageId,EncodedPixels\nID_a,-1\nID_b,10 5 1000 3\nID_c,-1\n")
    return processed, csv


def stand_in(folder, name="kaggle"):
    """A `kaggle` executable that records its arguments, one per line."""
    folder.mkdir(exist_ok=True)
    exe = folder / name
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {folder}/args.txt\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return folder


def test_the_cli_gets_the_competition_the_file_and_the_message(prepared, tmp_path):
    processed, csv = prepared
    bin_dir = stand_in(tmp_path / "bin")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "KAGGLE_USERNAME": "me", "KAGGLE_KEY": "k", "HOME": str(tmp_path)}
    kaggle.submit(csv, "U-Net 512, fold 0", processed, env=env)
    args = (bin_dir / "args.txt").read_text().splitlines()
    assert args == [
        "competitions",
        "submit",
        "-c",
        "siim-acr-pneumothorax-segmentation",
        "-f",
        str(csv),
        "-m",
        "U-Net 512, fold 0",
    ]


def test_missing_cli_credentials_or_message_say_what_to_do(prepared, tmp_path):
    processed, csv = prepared
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = stand_in(tmp_path / "bin")
    with pytest.raises(
        kaggle.KaggleError, match=r"kaggle CLI \(nokaggle\) is not installed: pip install 'pneumothorax\[kaggle\]'"
    ):
        kaggle.submit(csv, "m", processed, cli="nokaggle", env={"PATH": str(bin_dir), "HOME": str(home)})
    with pytest.raises(kaggle.KaggleError, match="no Kaggle credentials: create an API token"):
        kaggle.submit(csv, "m", processed, env={"PATH": str(bin_dir), "HOME": str(home)})
    assert not (bin_dir / "args.txt").exists()  # nothing was sent
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "me", "key": "k"}')
    assert kaggle.credentials({"HOME": str(home)}) == str(home / ".kaggle" / "kaggle.json")
    with pytest.raises(kaggle.KaggleError, match="say what this submission is"):
        kaggle.submit(csv, " ", processed, env={"PATH": str(bin_dir), "HOME": str(home)})


def test_an_invalid_csv_is_never_sent(prepared, tmp_path):
    processed, csv = prepared
    bin_dir = stand_in(tmp_path / "bin")
    env = {"PATH": str(bin_dir), "KAGGLE_USERNAME": "me", "KAGGLE_KEY": "k"}
    csv.write_text("ImageId,EncodedPixels\nID_a,-1\nID_b,-1\n")
    with pytest.raises(SubmissionError, match="1 image.* missing, e.g. ID_c"):
        kaggle.submit(csv, "m", processed, env=env)
    csv.write_text("ImageId,EncodedPixels\nID_a,-1\nID_b,1048570 10\nID_c,-1\n")
    with pytest.raises(SubmissionError, match="row 3 \\(image ID_b\\)"):
        kaggle.submit(csv, "m", processed, env=env)
    assert not (bin_dir / "args.txt").exists()
