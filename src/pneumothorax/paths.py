"""Project paths, all rooted at the repository (never the working directory)."""

from __future__ import annotations

from pathlib import Path

ROOT: Path = Path(__file__).resolve().parents[2]
"""The repository root (``src/pneumothorax/paths.py`` -> two levels up)."""

CONFIGS: Path = ROOT / "configs"
DATA: Path = ROOT / "data"
RAW: Path = DATA / "raw"
PROCESSED: Path = DATA / "processed"
EXTERNAL: Path = DATA / "external"
MODELS: Path = ROOT / "models"
SUBMISSIONS: Path = ROOT / "submissions"

PATIENT_MAP: Path = EXTERNAL / "kaggle-to-nih-id.csv"
"""Kaggle image id -> NIH ChestX-ray14 image name, which names the patient."""

REAL_MASKS: Path = EXTERNAL / "real-masks-rle.csv.gz"
"""A few hundred real SIIM RLE rows that give the synthetic world its shapes."""
