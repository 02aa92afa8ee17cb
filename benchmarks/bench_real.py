"""make bench-real REAL_DIR=<staged>: the real-data recipe (real_cpu and real_cpu_s1 side by side, blended) on the
real SIIM DICOMs of ../shared/data/siim-real-dev, timed step by step, with what the pipeline does on real pixels.

From REAL_DIR (what ``stage.sh`` wrote: ``dicom-images-train/``, ``stage_2_train.csv``, ``extra-positives/``)
it builds a Kaggle-style data folder of symlinks (``data/raw/siim-real-bench``; nothing copied): a
patient-grouped, label-stratified seventh of the DICOMs is held out as a stage-2 test set
(``stage_2_images/ID_<9 hex>.dcm``, its sample submission, and ``test-labels.csv`` to score it), the rest
are the training images (``stage_2_train.csv``, ``dicom-images-train/``), and the extra positives of every
patient not in that test set are ``extra/``. Then ``make prepare folds train-cls train-seg oof infer search
submit score report EXP=<member>`` runs one step at a time in the bench's own folders
(``models/bench-real/``, ``data/processed/bench-real/``, emptied first so that every step is timed from
scratch), each member on one core beside the other; ``make ensemble`` blends them, and
``benchmarks/results/bench_real.json`` gets, for the blend and for each member (``members``):
the OOF score at 1024 after the search against all-empty, per fold the gate's AUC and MCC, the positives
found, the Dice on positives, the false-positive images, the held-out test score, the time of every step,
the search left one fold out (``oof_crossfit``: each fold scored with the rule chosen on the others),
and the prepared intensities of the real images beside a synthetic world's (``bench_real_histogram.png``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, prepared_world, save  # noqa: E402

from pneumothorax.data import prepare, prepared, splitting  # noqa: E402
from pneumothorax.io import atomic, config, metric, paths, plots, rle  # noqa: E402
from pneumothorax.io.paths import ExperimentDir, ProcessedDir  # noqa: E402
from pneumothorax.pipeline import ensemble, search  # noqa: E402

STEPS = ("prepare", "folds", "train-cls", "train-seg", "oof", "infer", "search", "submit", "score", "report")
HELD_OUT = 7  # one patient-grouped seventh of the DICOMs is the test set
# The real-data recipe: real_cpu and its seed-1 twin on one split, trained side by side (a core each) and
# blended by make ensemble (docs/results.md: six such pairs +0.0077 to +0.0125 over all-empty, their members alone
# +0.0050 to +0.0099).
RECIPE = ("real_cpu", "real_cpu_s1")
RECIPE_NAME = "real_cpu_pair"
# The bench's own folders, emptied at each run so that every step is timed from scratch (a user's
# models/real_cpu would otherwise be found up to date, and the bench would time nothing).
BENCH_MODELS = paths.MODELS / "bench-real"
BENCH_PROCESSED = paths.PROCESSED / "bench-real"
# The synthetic worlds plotted beside the real images: the generator's default, and its preset moved towards real.
SYNTHETIC = {"synthetic": "default", "synthetic_real_preset": "real"}
LABELS = {"real": "real SIIM DICOMs", "synthetic": "synthetic world", "synthetic_real_preset": "synthetic, real preset"}


def _labels(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, skipinitialspace=True, encoding="utf-8-sig")
    table.columns = [c.strip() for c in table.columns]
    return table


def _held_out(labels: pd.DataFrame, patients: dict[str, str], seed: int) -> set[str]:
    """The test images: fold 0 of a patient-grouped split stratified by label and mask area."""
    runs = {i: [rle.parse(v) for v in rows] for i, rows in labels.groupby("ImageId")["EncodedPixels"]}
    area = {i: int(sum((ends - starts).sum() for starts, ends in parsed)) for i, parsed in runs.items()}
    meta = pd.DataFrame({"image_id": list(area), "mask_area": list(area.values())})
    meta["has_pneumothorax"] = (meta["mask_area"] > 0).astype(int)
    meta["patient"] = meta["image_id"].map(lambda i: patients.get(i, i))
    split = splitting.make_folds(meta, HELD_OUT, seed)
    return set(split.loc[split["fold"] == 0, "image_id"])


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def build_layout(real: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """The bench's data folder (symlinks into ``real``); how many images each part has."""
    labels = _labels(real / "stage_2_train.csv")
    patients = prepare.read_patient_map(paths.PATIENT_MAP)
    test = _held_out(labels, patients, seed)
    test_patients = {patients.get(i, i) for i in test}
    names = {i: "ID_" + hashlib.sha1(i.encode()).hexdigest()[:9] for i in sorted(test)}
    for dicom in sorted((real / "dicom-images-train").glob("*.dcm")):
        image_id = dicom.stem
        where = (
            out / "stage_2_images" / f"{names[image_id]}.dcm"
            if image_id in test
            else out / "dicom-images-train" / dicom.name
        )
        _link(dicom, where)
    train = labels[~labels["ImageId"].isin(test)]
    atomic.write_csv(out / "stage_2_train.csv", train)
    held = labels[labels["ImageId"].isin(test)].assign(ImageId=lambda t: t["ImageId"].map(names))
    atomic.write_csv(out / "test-labels.csv", held)
    sample = pd.DataFrame({"ImageId": sorted(names.values()), "EncodedPixels": "-1"})
    atomic.write_csv(out / "stage_2_sample_submission.csv", sample)
    extra = _labels(real / "extra-positives" / "labels.csv")
    extra = extra[~extra["ImageId"].map(lambda i: patients.get(i, i)).isin(test_patients)]
    kept = set(extra["ImageId"])
    for image in sorted((real / "extra-positives").rglob("*")):
        if image.suffix.lower() in (".jpg", ".jpeg", ".png") and image.parent.name != "mask" and image.stem in kept:
            _link(image, out / "extra" / image.parent.name / image.name)
    atomic.write_csv(out / "extra" / "labels.csv", extra)
    return {"train": train["ImageId"].nunique(), "test": len(names), "extra": len(kept)}


def make(goal: str, variables: list[str], threads: int | None = None) -> float:
    """``make goal`` in the repository with these variables, timed (seconds); ``threads``: its torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    started = time.time()
    subprocess.run(["make", "--no-print-directory", "-C", str(paths.ROOT), goal, *variables], check=True, env=env)
    seconds = round(time.time() - started, 1)
    print(f"bench-real: {goal} took {seconds} s", flush=True)
    return seconds


def run_steps(variables: list[str], steps: tuple[str, ...] = STEPS, threads: int | None = None) -> dict[str, float]:
    """Each step through make, timed (seconds)."""
    return {step: make(step, variables, threads) for step in steps}


def histogram(processed: Path, size: int, out: Path) -> dict[str, dict[str, float]]:
    """The prepared training images' intensities, real beside a synthetic world's: a plot and their percentiles."""
    kinds = {"real": np.asarray(prepared.load_cache(processed, "images", "train", size))}
    for name, difficulty in SYNTHETIC.items():
        with tempfile.TemporaryDirectory() as tmp:
            _, synth_processed = prepared_world(Path(tmp), 200, 0, (size,), seed=0, difficulty=difficulty)
            kinds[name] = np.asarray(prepared.load_cache(synth_processed, "images", "train", size))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pixels in kinds.items():
        ax.hist(pixels.ravel(), bins=64, range=(0, 256), density=True, histtype="step", label=LABELS[name])
    ax.set_xlabel(f"prepared pixel value ({size} px cache)")
    ax.set_ylabel("density")
    ax.legend()
    plots.save(fig, out)  # atomic, and makes benchmarks/results/ on a fresh clone
    return {
        name: {f"p{q}": float(np.percentile(pixels, q)) for q in (1, 5, 25, 50, 75, 95, 99)}
        | {"mean": float(pixels.mean()), "image_std": float(pixels.reshape(len(pixels), -1).std(1).mean())}
        for name, pixels in kinds.items()
    }


def scores(post: dict) -> dict:
    """What a searched ``postprocess.json`` says: the OOF score at 1024 against all-empty, and how it got there."""
    full = post["full_resolution"]
    return {
        "oof_score_1024": post["score_full_resolution"],
        "oof_all_empty": full["all_empty_score"],  # at 1024, as the score (tiny masks vanish at the search size)
        "oof_gain_over_all_empty": post["score_full_resolution"] - full["all_empty_score"],
        "postprocess": post["postprocess"],
        "oof_images": full["n_images"],
        "oof_positives": full["n_positive"],
        "oof_positives_found": full["positives_found"],
        "oof_dice_positive": full["dice_positive"],
        "oof_false_positive_images": full["false_positive_images"],
    }


def collect(exp: ExperimentDir) -> dict:
    """What the run scored: OOF at 1024 after the search, per-fold gate metrics, the held-out test."""
    post = json.loads(exp.postprocess.read_text())
    oof = json.loads(exp.oof_summary.read_text())
    gate = [f.get("classifier", {}) for f in oof["folds"]]
    return scores(post) | {
        "gate_auc_per_fold": [g.get("auc") for g in gate],
        "gate_mcc_per_fold": [g.get("mcc") for g in gate],
        "gate_score_auc_per_fold": post.get("gate_auc", []),  # of the searched gate score (postprocess.gate_blend)
        "seg_dice_at_0.5_per_fold": [f["dice_at_0.5"] for f in oof["folds"]],
        "test": json.loads(exp.score.read_text()),
    }


def bench_experiment(name: str, data: Path, processed: Path) -> dict:
    """One experiment's steps from scratch in the bench's folders: their times and what the run scored."""
    exp = ExperimentDir(BENCH_MODELS / name)
    shutil.rmtree(exp.root, ignore_errors=True)
    started = time.time()
    times = run_steps([f"EXP={name}", *bench_variables(data, processed)])
    return finished(name, exp, processed, times, started)


def finished(name: str, exp: ExperimentDir, processed: Path, times: dict[str, float], started: float) -> dict:
    """A benched run's times, scores, and its search left one fold out (at the maps' size: the gain a
    searched rule keeps on images it did not see)."""
    minutes = round((time.time() - started) / 60, 1)
    crossfit = search.crossfit(config.load(name), exp, ProcessedDir(processed))
    return {"exp": name, "seconds": times, "minutes_total": minutes} | collect(exp) | {"oof_crossfit": crossfit}


def bench_members(members: list[str], data: Path, processed: Path, jobs: int) -> list[dict]:
    """Every member from scratch, ``jobs`` at once, each on its share of the cores (its torch threads): on 2
    cores two trainings of one core each run 1.03-1.37x the steps of one on both (``docs/benchmarks.md``,
    ``shared_cores``). The prepared caches are shared, so each member's ``prepare`` runs first, one after the
    other. Each member's ``minutes_total`` counts from the start of the first ``prepare``."""
    if jobs <= 1:
        return [bench_experiment(m, data, processed) for m in members]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    started = time.time()
    prepared_in = {}
    for name in members:
        shutil.rmtree(BENCH_MODELS / name, ignore_errors=True)
        prepared_in[name] = make("prepare", [f"EXP={name}", *bench_variables(data, processed)])

    def run(name: str) -> dict:
        times = run_steps([f"EXP={name}", *bench_variables(data, processed)], STEPS[1:], threads)
        return finished(
            name, ExperimentDir(BENCH_MODELS / name), processed, {"prepare": prepared_in[name], **times}, started
        )

    with ThreadPoolExecutor(jobs) as pool:
        return [r | {"threads": threads} for r in pool.map(run, members)]


def bench_variables(data: Path, processed: Path) -> list[str]:
    """The make variables every step of the bench runs with: its data, its own folders, quiet."""
    return [
        f"DATA_DIR={data}",
        f"LABELS={data / 'test-labels.csv'}",
        "QUIET=1",
        f"MODELS_DIR={BENCH_MODELS}",
        f"PROCESSED_DIR={processed}",
        f"SUBMISSIONS_DIR={BENCH_MODELS / 'submissions'}",
    ]


def ensemble_oof_figures(members: list[str], name: str, processed: Path) -> dict:
    """The ensemble's search left one fold out, and per fold of the members' shared split the AUC of their mean
    classifier probability (its gate before the search blends in the U-Net); or why not (members of other splits)."""
    runs = [ensemble.member(config.load(m), BENCH_MODELS) for m in members]
    out = ensemble.out_dir(runs, BENCH_MODELS, name)
    try:
        ids, fold_of, gate = ensemble.blended_rows(runs, out)
        crossfit = ensemble.crossfit(runs, out, ProcessedDir(processed))
    except ValueError as err:
        return {"oof_crossfit": f"not cross-fitted: {err}", "gate_auc_per_fold": f"no shared split: {err}"}
    truth = ids["has_pneumothorax"].to_numpy()
    aucs = "no member has a gate"
    if gate is not None:
        aucs = [metric.roc_auc(truth[fold_of == k], gate[fold_of == k]) for k in np.unique(fold_of)]
    return {"oof_crossfit": crossfit, "gate_auc_per_fold": aucs}


def bench_ensemble(members: list[str], name: str, data: Path, processed: Path, jobs: int = 1) -> dict:
    """Every member from scratch (``jobs`` at once), then ``make ensemble`` (equal weights) scored on the
    held-out test. ``minutes_total`` is the wall clock of it all."""
    started = time.time()
    runs = bench_members(members, data, processed, jobs)
    exp = ExperimentDir(BENCH_MODELS / name)
    shutil.rmtree(exp.root, ignore_errors=True)
    seconds = make("ensemble", [f"ENSEMBLE={' '.join(members)}", f"NAME={name}", *bench_variables(data, processed)])
    post = json.loads(exp.postprocess.read_text())
    return {
        "exp": name,
        "members": runs,
        "jobs": jobs,
        **ensemble_oof_figures(members, name, processed),
        "seconds": {"ensemble": seconds},  # each member's steps are in its own entry
        "minutes_total": round((time.time() - started) / 60, 1),
        **scores(post),
        "gate_score_auc": post.get("gate_auc", []),
        "test": json.loads(exp.score.read_text()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--real-dir", required=True, help="what stage.sh wrote (dicom-images-train/, stage_2_train.csv, ...)"
    )
    p.add_argument("--exp", help="one experiment alone (default: real_cpu and real_cpu_s1 side by side, blended)")
    p.add_argument("--ensemble", nargs="*", default=[], help="members: train each, then blend them (make ensemble)")
    p.add_argument("--name", default="real_ensemble", help="the ensemble's name (models/bench-real/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="members trained at once, the cores shared out")
    p.add_argument("--data", default=str(paths.RAW / "siim-real-bench"))
    args = p.parse_args()
    if args.exp and args.ensemble:
        p.error("name one experiment (--exp, make's EXP=) or an ensemble (--ensemble, ENSEMBLE=), not both")
    data = Path(args.data)
    parts = build_layout(Path(args.real_dir), data)
    print(f"bench-real: {parts} images in {data}", flush=True)
    processed = BENCH_PROCESSED / data.name
    shutil.rmtree(processed, ignore_errors=True)
    if args.exp:
        save(f"bench_real_{args.exp}", {"images": parts} | bench_experiment(args.exp, data, processed))
        return
    if args.ensemble:
        results = bench_ensemble(args.ensemble, args.name, data, processed, args.jobs)
        save(f"bench_real_{args.name}", {"images": parts} | results)
        return
    results = {"images": parts} | bench_ensemble(list(RECIPE), RECIPE_NAME, data, processed, len(RECIPE))
    results["intensity"] = histogram(processed, 128, RESULTS / "bench_real_histogram.png")
    results["report"] = str(ExperimentDir(BENCH_MODELS / RECIPE[0]).summary)
    save("bench_real", results)


if __name__ == "__main__":
    main()
