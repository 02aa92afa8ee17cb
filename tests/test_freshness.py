"""What reruns (pneumothorax.io.freshness): a step is out of date exactly when a value or an input it reads
changed since it ran; set back, it is up to date again; compile, workers and comments change nothing."""

from __future__ import annotations

import json

import pytest

from pneumothorax.io import config, freshness, paths
from pneumothorax.io.freshness import Inputs
from pneumothorax.train import trainer

pytestmark = pytest.mark.unit

MANIFESTS = {"train": "train-v1", "test": "test-v1"}
NOW = Inputs(dict(MANIFESTS), "digest-v1")


def _finished(exp: paths.ExperimentDir, cfg: config.Config, inputs: Inputs = NOW) -> None:
    """Every output of an experiment exists and was made under ``cfg`` and ``inputs``."""
    for step, target in freshness.step_outputs(exp):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("made")
        freshness.record(exp, step, cfg, inputs)
    for step, name, run in freshness.training_runs(exp, cfg):
        run.root.mkdir(parents=True, exist_ok=True)
        run.model.write_bytes(b"weights")
        digest = None if name == "pretrain" else inputs.train_digest
        under = trainer.settings_for(cfg, step, cfg.seed, f"split-of-{name}", digest).section
        run.trained_under.write_text(json.dumps(under))


def _stale(exp: paths.ExperimentDir, cfg: config.Config, inputs: Inputs = NOW) -> set[str]:
    return {str(p.relative_to(exp.root)) for p in freshness.stale_outputs(exp, cfg, inputs)}


RUNS = {f"{kind}fold{k}/model.pt" for kind in ("", "classifier/") for k in range(3)}


def test_each_step_reruns_exactly_when_what_it_reads_changed(tmp_path):
    demo = config.load("demo")
    exp = paths.ExperimentDir(tmp_path / "demo", demo.final_size)
    _finished(exp, demo)
    assert _stale(exp, demo) == set()
    speed_only = config.load("demo", ["compile=true", "data.workers=3"])
    assert _stale(exp, speed_only) == set()  # speed, not results: no step reads them
    edits = {
        "postprocess.r_th=[0]": {"postprocess.json"},
        "infer.batch_size=3": {"test/ids.csv"},
        "infer.tta=[vflip]": {"test/ids.csv", "oof/summary.json"},  # OOF maps follow the test maps' TTA
        "segmentation.oof_weights=last": {"oof/summary.json", *{f"fold{k}/model.pt" for k in range(3)}},
        "data.sizes=[64,96,128]": {"made/prepare.json"},
        "data.area_bins=3": {"folds.csv"},
        "seed=7": {"folds.csv", *RUNS, "pretrain/model.pt"},
        "classifier.lr=0.1": {f"classifier/fold{k}/model.pt" for k in range(3)} | {"pretrain/model.pt"},
        "segmentation.stages.1.lr=0.1": {f"fold{k}/model.pt" for k in range(3)},
        "classifier.enabled=false": {"oof/summary.json", "test/ids.csv", "postprocess.json", "pretrain/model.pt"},
        # what every model sees: both trainings and both predictions (not the search, which reads their maps)
        "data.clahe=2": {"oof/summary.json", "test/ids.csv", *RUNS, "pretrain/model.pt"},
        "segmentation.loss.lovasz=1": {f"fold{k}/model.pt" for k in range(3)},
        "segmentation.loss.image=0.5": {f"fold{k}/model.pt" for k in range(3)},
        "segmentation.loss.image_top=0.01": {f"fold{k}/model.pt" for k in range(3)},
        "postprocess.gate_top=[0.0,0.01]": {"postprocess.json"},
    }
    for edit, expected in edits.items():
        assert _stale(exp, config.load("demo", [edit])) == expected, edit
    # a segmenter whose encoder starts from the classifier reads the classifier's values too
    init = config.load("demo", ["segmentation.encoder_init=classifier"])
    assert "classifier" in freshness.section(init, "segmentation")


def test_inputs_rerun_what_reads_them_and_a_moved_folder_retrains_nothing(tmp_path):
    demo = config.load("demo")
    exp = paths.ExperimentDir(tmp_path / "demo", demo.final_size)
    _finished(exp, demo)
    new_test = Inputs({**MANIFESTS, "test": "test-v2"}, "digest-v1")
    assert _stale(exp, demo, new_test) == {"made/prepare.json", "test/ids.csv"}  # nothing retrained
    moved = Inputs({**MANIFESTS, "train": "train-moved"}, "digest-v1")  # the same files elsewhere, times kept
    assert _stale(exp, demo, moved) == {"made/prepare.json"}
    replaced = Inputs({**MANIFESTS, "train": "train-v2"}, "digest-v2")  # a replaced DICOM or an edited label
    assert _stale(exp, demo, replaced) == {"made/prepare.json", "folds.csv", *RUNS}  # not the external pretraining


def test_the_training_digest_ignores_where_the_files_lie():
    from pneumothorax.io import manifest

    train = {"files": [["/data/a.dcm", 10, 1]], "labels_sha1": "x", "layout": {"kind": "stage2"}}
    moved = {"files": [["/ssd/a.dcm", 10, 1]], "labels_sha1": "x", "layout": {"kind": "stage1"}}
    assert manifest.digest_of(train) == manifest.digest_of(moved)
    assert manifest.digest_of(train) != manifest.digest_of({**train, "files": [["/data/a.dcm", 12, 2]]})
    assert manifest.digest_of(train) != manifest.digest_of({**train, "labels_sha1": "y"})
    content = {"train": train, "test": {"files": []}}
    on_disk = Inputs.of_manifests(content)
    assert on_disk.train_digest == manifest.digest_of(train)
    assert on_disk.manifests["train"] != Inputs.of_manifests({**content, "train": moved}).manifests["train"]


def test_an_edit_set_back_or_only_previewed_reruns_nothing(tmp_path):
    """Nothing is written while Make plans: an edit that only `make -n` saw, or one reverted, leaves every
    output up to date; an experiment that ran under the other values is out of date under these."""
    demo = config.load("demo")
    a, b = (paths.ExperimentDir(tmp_path / name, demo.final_size) for name in ("a", "b"))
    _finished(a, demo)
    edited = config.load("demo", ["postprocess.r_th=[0]", "segmentation.stages.1.epochs=3"])
    other = Inputs({**MANIFESTS, "test": "test-v2"}, "digest-v1")
    before = {p: p.stat().st_mtime_ns for p in a.root.rglob("*") if p.is_file()}
    assert _stale(a, edited, other)  # what `make -n` with the edit and another test folder would plan
    assert {p: p.stat().st_mtime_ns for p in a.root.rglob("*") if p.is_file()} == before  # it wrote nothing
    assert _stale(a, demo) == set()  # set back: nothing to do
    _finished(b, edited, other)  # b ran under the edit and the other folder
    assert _stale(b, demo) == {"made/prepare.json", "test/ids.csv", "postprocess.json"} | {
        f"fold{k}/model.pt" for k in range(3)
    }


def test_a_key_added_later_keeps_older_experiments_up_to_date_at_its_default(tmp_path):
    """``data.clahe`` came after experiments were recorded without it: at 0 (off, what they ran under) their
    records stay as they were, so nothing retrains; any other value is recorded and compared."""
    demo = config.load("demo")
    assert demo.data.clahe == 0.0
    exp = paths.ExperimentDir(tmp_path / "demo", demo.final_size)
    _finished(exp, demo)
    records = [exp.made("oof"), exp.made("infer"), exp.segmenter(0).trained_under, exp.classifier(0).trained_under]
    assert not any("clahe" in path.read_text() for path in records)  # the records older code wrote
    equalized = config.load("demo", ["data.clahe=2"])
    other = paths.ExperimentDir(tmp_path / "equalized", demo.final_size)
    _finished(other, equalized)
    assert '"data.clahe": 2.0' in other.made("oof").read_text() and _stale(other, equalized) == set()
    assert _stale(other, config.load("demo", ["data.clahe=3"])) == _stale(other, demo) != set()
    trained_under = exp.segmenter(0).trained_under.read_text()
    assert not any(f"\"{key}\"" in trained_under for key in ("lovasz", "image", "image_top"))  # keys inside a section
    lovasz = config.load("demo", ["segmentation.loss.lovasz=0.5"])
    assert freshness.section(lovasz, "segmentation")["segmentation"]["loss"]["lovasz"] == 0.5
    assert "lovasz" in config.to_dict(demo)["segmentation"]["loss"]  # the config itself keeps every key
    assert "gate_top" not in exp.made("search").read_text()  # a list key, at its default [0.0]
    assert '"gate_top": [0.0, 0.01]' in json.dumps(
        freshness.section(config.load("demo", ["postprocess.gate_top=[0,0.01]"]), "search")
    )


def test_a_pinned_split_seed_moves_the_folds_and_seed_moves_only_the_trainings(tmp_path):
    """With ``split_seed`` set the folds read it instead of ``seed``: the runs of a seed ensemble share one split."""
    pinned = config.load("demo", ["split_seed=42"])
    exp = paths.ExperimentDir(tmp_path / "pinned", pinned.final_size)
    _finished(exp, pinned)
    assert _stale(exp, pinned) == set()
    assert _stale(exp, config.load("demo", ["split_seed=42", "seed=7"])) == {*RUNS, "pretrain/model.pt"}
    assert _stale(exp, config.load("demo", ["split_seed=7"])) == {"folds.csv"}  # the trainings follow it by time
    assert "split_seed" not in json.dumps(freshness.section(config.load("demo"), "folds"))  # older records hold


def test_a_run_from_before_trained_under_json_is_judged_by_its_saved_config(tmp_path):
    """Such a run recorded no inputs: a fold is out of date (it learnt from unknown inputs); a pre-training,
    which reads none, is judged by the config saved beside it."""
    demo = config.load("demo")
    exp = paths.ExperimentDir(tmp_path / "demo", demo.final_size)
    _finished(exp, demo)
    for run in (exp.segmenter(0), exp.pretrain):
        run.trained_under.unlink()
        run.config.write_text(config.dump(demo))
    assert _stale(exp, demo) == {"fold0/model.pt"}
    exp.pretrain.config.write_text(config.dump(config.load("demo", ["classifier.lr=0.1"])))
    assert _stale(exp, demo) == {"fold0/model.pt", "pretrain/model.pt"}


def test_every_step_has_a_make_rule_and_a_script():
    """What docs/maintaining.md promises: a step is one row of STEPS, one rule, one script that records it."""
    makefile = (paths.ROOT / "Makefile").read_text()
    for step, spec in freshness.STEPS.items():
        script = paths.ROOT / "scripts" / f"{spec.script}.py"
        assert script.exists(), step
        assert f"scripts/{spec.script}.py" in makefile, step
        source = script.read_text()
        records = f'cli.record("{step}"' in source
        trains = step in ("classifier", "segmentation") and "trainer" not in source  # the trainer records runs
        assert records or trains, f"{script.name} does not record step {step}"
