"""Every path the pipeline writes or reads, built here and nowhere else.

The repository's folders are rooted at the repository (never the working directory). A
processed folder (:class:`ProcessedDir`) holds what ``prepare`` makes from one download; an
experiment folder (:class:`ExperimentDir`, ``models/<exp>/``) holds everything trained and
predicted for one config, its folds included; a run folder (:class:`RunDir`) is one trained
model (a segmentation fold, a classifier fold or a pre-training). The Makefile spells the same
paths (``make print-paths`` shows them; a test compares them with these classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT: Path = Path(__file__).resolve().parents[3]
"""The repository root (``src/pneumothorax/io/paths.py`` -> three levels up)."""

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


@dataclass(frozen=True)
class ProcessedDir:
    """``data/processed/<data>/``: what ``prepare`` made from one download, shared by experiments."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.csv"

    @property
    def record(self) -> Path:
        """``prepare.json``: per-image signatures, cached sizes, the layout read."""
        return self.root / "prepare.json"

    @property
    def report(self) -> Path:
        return self.root / "prepare-report.json"

    def progress(self, split: str) -> Path:
        """The resume log of a split's decoding (removed when the split is done)."""
        return self.root / f".prepare-{split}.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".prepare.lock"

    def inputs(self, split: str) -> Path:
        """The input manifest of ``train`` or ``test`` (files, sizes, times, label hash)."""
        return self.root / f"inputs-{split}.json"

    def cache(self, kind: str, split: str, size: int) -> Path:
        """``images`` or ``masks`` of a split at one size (uint8 ``.npy``)."""
        return self.root / f"{kind}_{split}_{size}.npy"


@dataclass(frozen=True)
class RunDir:
    """One trained model's folder: resume state, weights, logs, curves and out-of-fold output."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def weights(self, which: str) -> Path:
        """``best``, ``last``, ``swa``, ``swa_stage<k>``, ``model`` (the done marker) -> ``<which>.pt``."""
        return self.root / f"{which}.pt"

    @property
    def model(self) -> Path:
        """The chosen weights with their metadata, written last: the run is done."""
        return self.weights("model")

    @property
    def state(self) -> Path:
        return self.root / "state.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "metrics.json"

    @property
    def trained_under(self) -> Path:
        """The values a finished run's fingerprint holds (its section, split and inputs), readable without torch."""
        return self.root / "trained_under.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (``logging.backend: tensorboard``)."""
        return self.root / "tensorboard"

    @property
    def mlflow_run_id(self) -> Path:
        """The MLflow run this run logs into (``logging.backend: mlflow``), so that a resumed run goes on in it."""
        return self.root / "mlflow_run_id"

    def stale(self, fingerprint: str) -> Path:
        """Where a run trained under another config is moved before retraining."""
        return self.root.with_name(f"{self.root.name}.stale-{fingerprint[:8]}")

    @property
    def lock(self) -> Path:
        """Held by the process that trains this run; beside the folder, which a stale run moves away."""
        return self.root.with_name(f"{self.root.name}.lock")


@dataclass(frozen=True)
class ExperimentDir:
    """``models/<exp>/``: one experiment's folds, runs, test predictions, post-processing, report."""

    root: Path
    final_size: int = 0  # the last segmentation stage's size: OOF and test maps are at it

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def folds(self) -> Path:
        """This experiment's split (other experiments never change it)."""
        return self.root / "folds.csv"

    def segmenter(self, fold: int) -> RunDir:
        return RunDir(self.root / f"fold{fold}")

    def classifier(self, fold: int) -> RunDir:
        return RunDir(self.root / "classifier" / f"fold{fold}")

    @property
    def pretrain(self) -> RunDir:
        return RunDir(self.root / "pretrain")

    def made(self, step: str) -> Path:
        """What step ``step``'s output was made under: ``made/<step>.json`` (see :mod:`pneumothorax.io.freshness`)."""
        return self.root / "made" / f"{step}.json"

    @property
    def prepared(self) -> Path:
        """Make's target of ``prepare`` for this experiment (the caches it made are shared): its record."""
        return self.made("prepare")

    @property
    def oof(self) -> Path:
        """The out-of-fold predictions of every fold (``make oof``)."""
        return self.root / "oof"

    def oof_maps(self, fold: int) -> Path:
        """Segmentation: uint8 p*255 maps of fold ``fold``'s held-out images at the final size."""
        return self.oof / f"fold{fold}.npy"

    def oof_ids(self, fold: int) -> Path:
        """image_id, index (row in the train caches), has_pneumothorax of :meth:`oof_maps`, in order."""
        return self.oof / f"fold{fold}_ids.csv"

    def oof_gate(self, fold: int) -> Path:
        """Classifier: image_id, label, prob of fold ``fold``'s held-out images."""
        return self.oof / f"fold{fold}_classifier.csv"

    @property
    def oof_summary(self) -> Path:
        """Per-fold scores of the OOF predictions, written last by ``make oof`` (its target)."""
        return self.oof / "summary.json"

    @property
    def test(self) -> Path:
        return self.root / "test"

    @property
    def blended_oof(self) -> Path:
        """An ensemble's out-of-fold maps (every training image, the members' weighted mean)."""
        return self.root / "oof.npy"

    @property
    def blended_ids(self) -> Path:
        return self.root / "oof_ids.csv"

    @property
    def ensemble(self) -> Path:
        """An ensemble's members, weights and scores."""
        return self.root / "ensemble.json"

    @property
    def test_maps(self) -> Path:
        return self.test / "probs.npy"

    @property
    def test_ids(self) -> Path:
        """image_id, row in the maps (-1: failed to decode), error; written last by ``infer``."""
        return self.test / "ids.csv"

    @property
    def test_gate(self) -> Path:
        return self.test / "gate.csv"

    @property
    def postprocess(self) -> Path:
        """The searched :class:`~pneumothorax.post.postprocess.PostProcess` and its scores."""
        return self.root / "postprocess.json"

    @property
    def old_postprocess(self) -> Path:
        """What ``postprocess.json`` was called before (read once, then renamed: see ``postprocess.adopt_old_name``)."""
        return self.root / "thresholds.json"

    @property
    def grid(self) -> Path:
        return self.root / "grid.csv"

    @property
    def gate_scores(self) -> Path:
        return self.root / "gate_scores.csv"

    @property
    def heatmap(self) -> Path:
        return self.root / "heatmap.png"

    @property
    def score(self) -> Path:
        return self.root / "score.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def summary(self) -> Path:
        return self.report / "summary.md"


@dataclass(frozen=True)
class WorldDir:
    """One synthetic world of an ablation and the folders of its runs."""

    root: Path
    seed: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def processed(self) -> ProcessedDir:
        return ProcessedDir(self.root / "processed")

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    @property
    def labels(self) -> Path:
        return self.data / "test-labels.csv"

    def exp(self, name: str, size: int) -> ExperimentDir:
        return ExperimentDir(self.models / name, size)

    def submission(self, name: str) -> Path:
        return submission(name, self.submissions)


@dataclass(frozen=True)
class AblationDir:
    """``models/<exp>/ablation/``: the variants' configs, a folder per world, and the tables."""

    root: Path

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def world(self, seed: int) -> WorldDir:
        return WorldDir(self.root / f"world{seed}", seed)

    @property
    def runs(self) -> Path:
        return self.root / "runs.csv"

    @property
    def table(self) -> Path:
        return self.root / "ablation.csv"

    @property
    def summary(self) -> Path:
        return self.root / "ablation.md"


@dataclass(frozen=True)
class PredictionDir:
    """``predictions/<name>/``: the table, a mask and an overlay per input file, a DICOM SEG per DICOM input."""

    root: Path

    @property
    def table(self) -> Path:
        return self.root / "predictions.csv"

    def mask(self, stem: str) -> Path:
        return self.root / "masks" / f"{stem}.png"

    def overlay(self, stem: str) -> Path:
        return self.root / "overlays" / f"{stem}.png"

    def segmentation(self, stem: str) -> Path:
        """The DICOM Segmentation object of a DICOM input (``--dicom-seg``)."""
        return self.root / "dicom_seg" / f"{stem}.dcm"


def submission(exp: str, folder: Path = SUBMISSIONS) -> Path:
    """``submissions/<exp>.csv``."""
    return Path(folder) / f"{exp}.csv"


def leaderboard(models_dir: Path = MODELS) -> tuple[Path, Path]:
    """``models/leaderboard.csv`` and ``.md``."""
    return Path(models_dir) / "leaderboard.csv", Path(models_dir) / "leaderboard.md"
