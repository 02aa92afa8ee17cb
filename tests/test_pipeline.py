"""The Makefile as the DAG: planning one fold, and the whole pipeline end to end on a tiny world."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pydicom
import pytest

from pneumothorax.data import synthetic
from pneumothorax.io import config, dicom, paths, rle
from pneumothorax.io.paths import ExperimentDir

pytestmark = pytest.mark.make  # every test here runs make (most with -n: planning only)


def make(*args: str, check: bool = True, dry: bool = False) -> subprocess.CompletedProcess:
    # -j2: what runs, runs as under a user's `make -j` (the folds side by side); a plan (-n) is the same either way
    cmd = ["make", "--no-print-directory", "-C", str(paths.ROOT), *(["-n"] if dry else ["-j2"]), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_make_plans_exactly_one_fold(tmp_path):
    plan = make(
        "train",
        "EXP=demo",
        "FOLD=2",
        f"MODELS_DIR={tmp_path}",
        f"PROCESSED_DIR={tmp_path}/p",
        "DATA_DIR=/nonexistent",
        dry=True,
    ).stdout
    seg = [line for line in plan.splitlines() if "04_train_segmentation.py" in line]
    cls = [line for line in plan.splitlines() if "03_train_classifier.py" in line]
    assert len(seg) == 1 and "--fold 2" in seg[0]
    assert len(cls) == 1 and "--fold 2" in cls[0]
    every = make("train", "EXP=demo", f"MODELS_DIR={tmp_path}", f"PROCESSED_DIR={tmp_path}/p", dry=True).stdout
    n_folds = config.load("demo").data.n_folds  # 3: FOLD=2 is the last fold
    assert sum("04_train_segmentation.py" in line for line in every.splitlines()) == n_folds == 3


def test_make_help_lists_targets_and_starts_no_python(tmp_path):
    listed = {line.split()[0] for line in make("help", f"VENV={tmp_path}/none").stdout.splitlines() if line.strip()}
    targets = ("demo", "prepare", "folds", "train", "oof", "infer", "search", "submit", "kaggle-submit", "gpu-check")
    assert set(targets) <= listed  # without a venv at all: help starts no Python


def test_make_n_writes_nothing(today, tmp_path):
    """Planning a whole run of a fresh experiment writes no file anywhere: no stamp, no manifest, no record."""
    out = tmp_path / "out"
    args = [f"DATA_DIR={today}", f"MODELS_DIR={out}/m", f"PROCESSED_DIR={out}/p", f"SUBMISSIONS_DIR={out}/s"]
    before = sorted(p for p in today.rglob("*"))
    plan = make("submit", "report", "EXP=tiny", *args, dry=True).stdout
    assert _planned(plan) == _plan(prepare=1, folds=1, classifier=2, segmentation=2, oof=1, infer=1, search=1, submit=1)
    assert not out.exists() and sorted(p for p in today.rglob("*")) == before


def test_the_makefile_builds_the_paths_of_the_experiment_folder(tmp_path):
    out = make("print-paths", "EXP=tiny", f"MODELS_DIR={tmp_path}/m", f"PROCESSED_DIR={tmp_path}/p").stdout
    made = dict(line.split(" ", 1) for line in out.splitlines())
    exp = ExperimentDir(tmp_path / "m" / "tiny", 64)
    ours = {
        "models": exp.root,
        "folds": exp.folds,
        "segmenter": exp.segmenter(0).model,
        "classifier": exp.classifier(0).model,
        "pretrain": exp.pretrain.model,
        "test_ids": exp.test_ids,
        "postprocess": exp.postprocess,
        "score": exp.score,
        "summary": exp.summary,
        "oof": exp.oof_summary,
        "prepared": exp.prepared,
        "submission": paths.submission("tiny", paths.ROOT / "submissions"),
    }
    assert {key: str(paths.ROOT / made[key]) if not made[key].startswith("/") else made[key] for key in ours} == {
        key: str(value) for key, value in ours.items()
    }


SCRIPTS = (
    "01_prepare",
    "02_folds",
    "03_train_classifier",
    "04_train_segmentation",
    "05_predict_oof",
    "06_infer",
    "07_search",
    "08_submit",
)


def _planned(plan: str) -> dict[str, int]:
    """How many times each pipeline script is run in a ``make -n`` plan (script paths, not target names)."""
    ran = re.findall(r"scripts/(\d\d_[a-z_]+)\.py", plan)
    return {name: sum(r.startswith(name) for r in ran) for name in SCRIPTS}


def _plan(**counts: int) -> dict[str, int]:
    """The plan running each named step that many times (``segmentation=2``), and nothing else."""
    return {name: counts.get(name.split("_")[-1], 0) for name in SCRIPTS}


def test_an_ensemble_of_one_or_of_an_unfinished_experiment_fails_at_once(tmp_path):
    models = f"MODELS_DIR={tmp_path}"
    one = make("ensemble", "ENSEMBLE=demo", "NAME=e", models, dry=True, check=False)
    assert one.returncode != 0 and "name two experiments or more" in one.stderr and 'got ENSEMBLE="demo"' in one.stderr
    (tmp_path / "a" / "test").mkdir(parents=True)
    for path in ("a/postprocess.json", "a/test/ids.csv", "b/postprocess.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    unfinished = make("ensemble", "ENSEMBLE=a b", "NAME=e", models, dry=True, check=False)
    assert unfinished.returncode != 0 and "ENSEMBLE member(s) b not searched and inferred" in unfinished.stderr
    bogus = make("ensemble", "ENSEMBLE=a b", "NAME=e", "WEIGHTS=best", models, dry=True, check=False)
    assert bogus.returncode != 0 and "WEIGHTS=best: use WEIGHTS=equal or WEIGHTS=search" in bogus.stderr


def test_a_step_before_the_venv_exists_says_to_install_it(tmp_path):
    result = make(
        "prepare", "EXP=tiny", f"VENV={tmp_path / 'no-venv'}", f"MODELS_DIR={tmp_path}", dry=True, check=False
    )
    assert result.returncode != 0 and "no-venv/bin/python is missing: run `make install` first" in result.stderr


def test_fold_out_of_range_fails_before_any_work(tmp_path):
    result = make("train", "EXP=tiny", "FOLD=9", f"MODELS_DIR={tmp_path}", dry=True, check=False)
    assert result.returncode != 0
    assert "FOLD=9 is not a fold of EXP=tiny, whose data.n_folds is 2: use FOLD=0 to FOLD=1" in result.stderr


def test_the_pipeline_on_todays_download_and_what_users_change(today, tmp_path):
    """`make prepare train infer submit score report DATA_DIR=<today's layout>`, then everything a user changes:
    config edits (planned, carried out, reverted), a new test folder, a broken and a repaired training DICOM, a
    mistyped folder, a replaced training image, the data folder moved, a missing fold, another experiment on the
    same processed folder. One finished run serves them all (each would otherwise train its own)."""
    models_dir, subs, processed = tmp_path / "models", tmp_path / "subs", tmp_path / "p"
    configs = tmp_path / "configs"
    configs.mkdir()
    base = "# an experiment of the test's own\ndefaults: [tiny]\n"
    (configs / "mine.yaml").write_text(base)
    common = [
        "EXP=mine",
        f"CONFIGS={configs}",
        f"DATA_DIR={today}",
        f"MODELS_DIR={models_dir}",
        f"SUBMISSIONS_DIR={subs}",
        f"PROCESSED_DIR={processed}",
        f"LABELS={today / 'test-labels.csv'}",
        "QUIET=1",
    ]
    broken = sorted((today / "stage_2_images").glob("ID_*.dcm"))[1]
    broken.write_bytes(b"corrupt")  # a broken test image still gets its row
    make("prepare", "train", "infer", "submit", "score", "report", *common)
    exp = ExperimentDir(models_dir / "mine", 64)
    _a_finished_run_is_complete_and_up_to_date(today, exp, subs / "mine.csv", broken, common)
    everything = ["prepare", "folds", "train", "infer", "search", "submit", "score", "report"]
    _config_edits_rerun_what_reads_them(configs / "mine.yaml", base, [*everything, *common])
    swapped = _a_new_test_folder_reruns_prepare_infer_and_submit(today, today / "new-test", common, subs)
    _a_broken_training_dicom_fails_prepare_then_is_read_again(today, processed, swapped)
    # a mistyped test folder is an error, not an empty submission; corrected, nothing reruns
    mistyped = [f"TEST_DIR={today / 'stage_2_imgs'}" if arg.startswith("TEST_DIR=") else arg for arg in swapped]
    typo = make("prepare", *mistyped, check=False)
    assert typo.returncode != 0 and "stage_2_imgs: test folder (TEST_DIR) does not exist" in typo.stderr
    assert make("-q", "prepare", *swapped, check=False).returncode == 0
    goals = ["prepare", "folds", "train", "infer", "search", "submit"]
    _a_replaced_training_image_retrains_every_run(today / "siim" / "dicom-images-train", exp, [*goals, *swapped])
    swapped = _a_moved_data_folder_retrains_nothing(today, tmp_path / "moved", goals, swapped)
    # one fold out of date reruns that fold and what depends on it, nothing else
    exp.segmenter(1).model.unlink()
    assert _planned(make("submit", *swapped, dry=True).stdout) == _plan(
        segmentation=1, oof=1, infer=1, search=1, submit=1
    )
    make("submit", *swapped)
    _another_experiment_on_the_same_processed_folder_keeps_its_own_folds(configs, exp, swapped)


def _a_finished_run_is_complete_and_up_to_date(today, exp: ExperimentDir, csv, broken, common: list[str]) -> None:
    sub = pd.read_csv(csv, dtype=str)
    sample = pd.read_csv(today / "stage_2_sample_submission.csv", dtype=str)
    assert list(sub.columns) == ["ImageId", "EncodedPixels"] and len(sub) == 8
    assert sub["ImageId"].tolist() == sample["ImageId"].tolist()  # exactly the sample's ids, in its order
    assert sub.set_index("ImageId").loc[broken.stem, "EncodedPixels"] == "-1"
    for value in sub["EncodedPixels"]:
        rle.parse(value)
    labels = rle.read_labels(today / "test-labels.csv")
    score = json.loads(exp.score.read_text())
    assert score["n_images"] == len(labels) and score["n_positive"] == sum(bool(rows) for rows in labels.values())
    post = json.loads(exp.postprocess.read_text())
    assert post["full_resolution"]["n_images"] == post["n_images"] == len(pd.read_csv(exp.folds))
    assert f"{post['score_full_resolution']:.4f}" in exp.summary.read_text()
    for path in (exp.grid, exp.heatmap, exp.test_maps, exp.classifier(1).summary, exp.report / "worst.png"):
        assert path.exists(), path
    everything = ["prepare", "folds", "train", "infer", "search", "submit", "score", "report"]
    assert make("-q", *everything, *common, check=False).returncode == 0  # a finished run is up to date


def _config_edits_rerun_what_reads_them(yaml_file, base: str, args: list[str]) -> None:
    def plan_after(text: str, carry_out: bool = True) -> dict[str, int]:
        yaml_file.write_text(base + text)
        planned = _planned(make(*args, dry=True).stdout)
        if carry_out:
            make(*args)  # the next edit starts from an up-to-date run
        return planned

    assert plan_after("# only a comment\n") == _plan()
    assert plan_after("postprocess: {r_th: [0, 2048]}\n") == _plan(search=1, submit=1)
    carried = "postprocess: {r_th: [0, 2048]}\ninfer: {tta: [vflip]}\n"
    # a TTA edit: the OOF maps are predicted as the test maps are, so they and the search follow; nothing retrains
    assert plan_after(carried) == _plan(oof=1, infer=1, search=1, submit=1)
    # the edits below are planned only (each retrains, and the replaced image below carries out a retraining)
    edited_stage = "segmentation: {stages: [{size: 32, epochs: 1, batch_size: 16, lr: 0.002, augment: [A1]}, " + (
        "{size: 64, epochs: 1, batch_size: 16, lr: 0.001, swa_epochs: 1, augment: [A1, A2]}]}\n"
    )
    retrained = {"oof": 1, "infer": 1, "search": 1, "submit": 1}
    assert plan_after(carried + edited_stage, False) == _plan(segmentation=2, **retrained)
    assert plan_after(carried + "classifier: {lr: 0.001}\n", False) == _plan(classifier=2, **retrained)
    # a changed split, and a seed every training reads
    folds_edit = plan_after(carried + "data: {area_bins: 3}\n", carry_out=False)
    assert folds_edit == _plan(folds=1, classifier=2, segmentation=2, **retrained)
    assert plan_after(carried + "seed: 7\n", carry_out=False) == folds_edit
    steps_edit = "data: {sizes: [32, 48, 64]}\ninfer: {tta: [vflip], batch_size: 3}\npostprocess: {r_th: [0]}\n"
    assert plan_after(steps_edit, carry_out=False) == _plan(prepare=1, infer=1, search=1, submit=1)
    # the same edit as an override from Make, then dropped: it plans what the YAML edit planned, and back
    yaml_file.write_text(base + carried)
    override = "SET=postprocess.r_th=[0] infer.batch_size=3 data.sizes=[32,48,64]"
    assert _planned(make(*args, override, dry=True).stdout) == _plan(prepare=1, infer=1, search=1, submit=1)
    # those edits reverted: what `make -n` saw leaves nothing to plan or invoke (each step's output, and
    # each model, records the values it was made under; nothing was written while Make planned)
    assert _planned(make(*args, dry=True).stdout) == _plan()
    assert make("-q", *args, check=False).returncode == 0


def _a_new_test_folder_reruns_prepare_infer_and_submit(today, new_test, common: list[str], subs) -> list[str]:
    """Another test folder: prepare, infer and submit rerun, nothing is retrained; one only `make -n` saw
    reruns nothing once dropped. The arguments that name the new folder."""
    new_test.mkdir()
    for path in sorted((today / "stage_2_images").glob("ID_*.dcm"))[2:6]:
        shutil.copy(path, new_test / path.name)
    swapped = [*common, f"TEST_DIR={new_test.name}", "SAMPLE_SUBMISSION=none"]  # relative to DATA_DIR
    plan = _planned(make("prepare", "folds", "train", "infer", "submit", *swapped, dry=True).stdout)
    assert plan == _plan(prepare=1, infer=1, submit=1)
    assert make("-q", "prepare", "folds", "train", "infer", "submit", *common, check=False).returncode == 0
    make("prepare", "infer", "submit", *swapped)
    sub = pd.read_csv(subs / "mine.csv", dtype=str)
    assert sorted(sub["ImageId"]) == sorted(p.stem for p in new_test.glob("*.dcm"))
    return swapped


def _a_broken_training_dicom_fails_prepare_then_is_read_again(today, processed, args: list[str]) -> None:
    victim = sorted((today / "siim" / "dicom-images-test").rglob("*.dcm"))[3]  # an image with no second copy
    good = victim.read_bytes()
    victim.write_bytes(b"truncated")
    failed = make("prepare", *args, check=False)
    assert failed.returncode != 0 and str(victim) in failed.stderr and "unreadable training file" in failed.stderr
    victim.write_bytes(good)
    assert _planned(make("prepare", *args, dry=True).stdout)["01_prepare"] == 1
    make("prepare", *args)
    meta = pd.read_csv(processed / "metadata.csv", dtype=str, keep_default_na=False)
    assert (meta["error"] == "").all()


def _another_experiment_on_the_same_processed_folder_keeps_its_own_folds(configs, exp, args: list[str]) -> None:
    """`make folds` of a 3-fold experiment leaves a finished 2-fold experiment's split and results alone."""
    before = exp.folds.read_bytes()
    (configs / "three.yaml").write_text("defaults: [tiny]\ndata: {n_folds: 3}\n")
    make("folds", *[a for a in args if not a.startswith("EXP=")], "EXP=three")
    assert exp.folds.read_bytes() == before
    assert pd.read_csv(exp.root.parent / "three" / "folds.csv")["fold"].nunique() == 3
    assert make("-q", "folds", "train", "search", *args, check=False).returncode == 0


def _a_moved_data_folder_retrains_nothing(world, moved, goals: list[str], common: list[str]) -> list[str]:
    """The data folder moved, times kept (to a faster disk, say): prepare, infer and submit read the new
    paths; nothing retrains. The arguments that name the new folder."""
    shutil.move(world, moved)
    common = [f"DATA_DIR={moved}" if arg.startswith("DATA_DIR=") else arg for arg in common]
    assert _planned(make(*goals, *common, dry=True).stdout) == _plan(prepare=1, infer=1, submit=1)
    make(*goals, *common)
    assert make("-q", *goals, *common, check=False).returncode == 0
    return common


def _a_replaced_training_image_retrains_every_run(train_dir, exp: ExperimentDir, goals: list[str]) -> None:
    """A training DICOM replaced by one with other pixels, its labels and so the split unchanged: the images
    a model learns from changed, so every run retrains; once done, nothing is planned."""
    replaced = sorted(train_dir.rglob("*.dcm"))[0]
    pixels, _ = dicom.read(replaced)
    ds = pydicom.dcmread(replaced)
    tags = {key: str(ds.get(key, "")) for key in ("SOPInstanceUID", "StudyInstanceUID", "PatientID", "PatientAge")}
    synthetic.write_dicom(replaced, 255 - pixels, tags)
    split, trained = exp.folds.read_bytes(), json.loads(exp.segmenter(0).trained_under.read_text())
    replan = _plan(prepare=1, folds=1, classifier=2, segmentation=2, oof=1, infer=1, search=1, submit=1)
    assert _planned(make(*goals, dry=True).stdout) == replan
    make(*goals)
    retrained = json.loads(exp.segmenter(0).trained_under.read_text())
    assert exp.folds.read_bytes() == split and retrained["split"] == trained["split"]
    assert retrained["train_inputs"] != trained["train_inputs"]
    assert _planned(make(*goals, dry=True).stdout) == _plan()
    assert make("-q", *goals, check=False).returncode == 0
