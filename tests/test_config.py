"""Configs: shipped recipes load, typos fail with their key, the resolved config round-trips."""

from __future__ import annotations

import json
import os

import pytest

from pneumothorax import config, manifest, paths

SHIPPED = sorted(p.stem for p in paths.CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_round_trip(name):
    cfg = config.load(name)
    assert cfg.name == name
    assert config.from_yaml(config.dump(cfg)) == cfg
    for stage in cfg.segmentation.stages:
        assert stage.size in cfg.data.sizes
    if cfg.classifier.enabled:
        assert cfg.classifier.size in cfg.data.sizes


def test_published_recipes():
    exp1 = config.load("2st_exp1")
    assert exp1.data.channels == 1 and exp1.segmentation.stages[0].scheduler == "plateau"
    assert (exp1.segmentation.stages[0].epochs, exp1.segmentation.stages[0].batch_size) == (50, 40)
    assert exp1.postprocess.b_th.values() == [0.5]
    exp3 = config.load("2st_exp3")
    assert [(s.size, s.epochs, s.batch_size) for s in exp3.segmentation.stages] == [(256, 35, 40), (512, 10, 14)]
    exp5 = config.load("2st_exp5")
    assert [(s.size, s.epochs, s.batch_size, s.swa_epochs) for s in exp5.segmentation.stages] == [
        (256, 100, 64, 5),
        (512, 70, 16, 3),
    ]
    assert exp5.postprocess.r_th == (2048,) and exp5.segmentation.encoder == "resnet34"
    assert len(exp5.postprocess.b_th.values()) == 701
    first = config.load("1st_place")
    assert [s.size for s in first.segmentation.stages] == [512, 1024] and first.postprocess.triplet
    assert first.segmentation.stages[0].positive_rate > first.segmentation.stages[0].positive_rate_end


def test_unknown_key_fails_with_its_name(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("defaults: [base]\nsegmentation:\n  stages:\n    - {size: 256, epoch: 3}\n")
    with pytest.raises(config.ConfigError, match=r"segmentation\.stages\[0\]\.epoch"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="classifer"):
        config.load("demo", ["classifer.epochs=2"])


def test_wrong_type_and_choice():
    with pytest.raises(config.ConfigError, match="segmentation.amp"):
        config.load("demo", ["segmentation.amp=fp8"])
    with pytest.raises(config.ConfigError, match="classifier.epochs: expected an integer"):
        config.load("demo", ["classifier.epochs=two"])


def test_overrides_and_inheritance():
    cfg = config.load("2st_exp3", ["segmentation.stages.1.epochs=2", "seed=7"])
    assert cfg.segmentation.stages[1].epochs == 2 and cfg.seed == 7
    assert cfg.segmentation.stages[0].epochs == 35  # from 2st_exp3's own stages
    assert config.load("tiny").segmentation.encoder == config.load("demo").segmentation.encoder  # tiny -> demo -> base


def test_unknown_experiment_lists_known():
    with pytest.raises(config.ConfigError, match="known experiments"):
        config.load("nope")


def test_base_is_the_one_source_of_defaults(tmp_path):
    """Section dataclasses have no defaults: a key missing from the chain fails with its dotted name."""
    (tmp_path / "base.yaml").write_text(paths.CONFIGS.joinpath("base.yaml").read_text().replace("  grad_clip: 0.0", ""))
    (tmp_path / "child.yaml").write_text("defaults: [base]\n")
    with pytest.raises(config.ConfigError, match="missing config key 'segmentation.grad_clip'"):
        config.load(tmp_path / "child.yaml")
    with pytest.raises(TypeError):
        config.InferConfig()  # no defaults in the dataclass


def test_interpolation_and_list_overrides(tmp_path):
    path = tmp_path / "interp.yaml"
    path.write_text("defaults: [demo]\nclassifier: {size: '${data.sizes.1}'}\n")
    assert config.load(path).classifier.size == 128
    assert config.load(path, ["data.sizes=[64, 256]"]).classifier.size == 256  # resolved after overrides
    with pytest.raises(config.ConfigError, match="override 'segmentation.stages.7.lr'"):
        config.load("demo", ["segmentation.stages.7.lr=1"])


def test_sections_name_what_each_step_reads():
    demo = config.load("demo")
    assert config.section(demo, "postprocess")["postprocess"]["r_th"] == list(demo.postprocess.r_th)
    same = config.load("demo", ["compile=true", "data.workers=1", "postprocess.r_th=[0]"])
    assert config.fingerprint(config.section(same, "segmentation")) == config.fingerprint(
        config.section(demo, "segmentation")
    )
    lr = config.load("demo", ["segmentation.stages.1.lr=0.1"])
    old, new = config.section(demo, "segmentation"), config.section(lr, "segmentation")
    assert config.fingerprint(old) != config.fingerprint(new)
    assert config.changed_keys(old, new) == [
        "segmentation.stages: " + repr(old["segmentation"]["stages"]) + " -> " + repr(new["segmentation"]["stages"])
    ]
    init = config.load("demo", ["segmentation.encoder_init=classifier"])
    assert "classifier" in config.section(init, "segmentation")  # its encoder starts from the classifier


def test_stamps_are_rewritten_only_when_their_section_changes(tmp_path):
    from pneumothorax import query

    exp, processed = tmp_path / "demo", tmp_path / "p"
    inputs = manifest.path_for(processed, "train")
    manifest.write_if_changed(inputs, {"files": [["a.dcm", 10, 1]], "labels_sha1": "x"})
    assert query.main(["stamps", "--config", "demo", "--exp-dir", str(exp), "--processed", str(processed)]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (exp / "stamps").glob("*.json")}
    runs = {f"{task}-fold{k}.json" for task in ("classifier", "segmentation") for k in range(3)}
    inputs_stamps = {"inputs.json", "test-inputs.json"}
    assert set(stamps) == {f"{name}.json" for name in config.SECTIONS} | {*runs, "classifier-pretrain.json"} | {
        *inputs_stamps
    }
    child = tmp_path / "demo2.yaml"
    child.write_text("defaults: [demo]\ninfer: {batch_size: 3}\n")

    def changed_by(config_name: str) -> set[str]:
        assert (
            query.main(["stamps", "--config", config_name, "--exp-dir", str(exp), "--processed", str(processed)]) == 0
        )
        now = {p.name: p.stat().st_mtime_ns for p in (exp / "stamps").glob("*.json")}
        changed = {name for name in now if now[name] != stamps[name]}
        stamps.update(now)
        return changed

    assert changed_by(str(child)) == {"infer.json"}
    # a replaced training DICOM: the folds and every fold's run (not the pretraining on its own CSV), no section
    manifest.write_if_changed(inputs, {"files": [["a.dcm", 12, 2]], "labels_sha1": "x"})
    assert changed_by(str(child)) == runs | {"folds.json", "inputs.json"}
    # the same files moved elsewhere, times kept: prepare only (its metadata names the files)
    manifest.write_if_changed(inputs, {"files": [["/ssd/a.dcm", 12, 2]], "labels_sha1": "x", "layout": {"d": "/ssd"}})
    assert changed_by(str(child)) == {"inputs.json"}
    manifest.write_if_changed(inputs, {"files": [["/ssd/a.dcm", 12, 2]], "labels_sha1": "y", "layout": {"d": "/ssd"}})
    assert changed_by(str(child)) == runs | {"folds.json", "inputs.json"}  # an edited label file
    # a new test folder: prepare's and infer's records of the inputs, nothing trained
    manifest.write_if_changed(manifest.path_for(processed, "test"), {"files": [["t.dcm", 5, 3]]})
    assert changed_by(str(child)) == inputs_stamps
    assert json.loads((exp / "stamps" / "segmentation-fold0.json").read_text())["train_inputs"] == manifest.digest(
        processed
    )


def test_weights_that_training_will_not_write_fail_at_load():
    with pytest.raises(config.ConfigError, match="infer.weights: topk needs segmentation.top_k"):
        config.load("demo", ["infer.weights=topk"])
    with pytest.raises(config.ConfigError, match="segmentation.oof_weights: ema needs segmentation.ema_decay"):
        config.load("demo", ["segmentation.oof_weights=ema"])
    first = config.load("1st_place")
    assert (first.segmentation.top_k, first.segmentation.oof_weights, first.infer.weights) == (3, "topk", "topk")


def test_a_config_saved_before_new_keys_still_loads_with_their_defaults():
    saved = config.to_dict(config.load("demo"))
    del saved["segmentation"]["top_k"], saved["classifier"]["accumulate"]  # keys a newer base.yaml added
    loaded = config.from_yaml(__import__("yaml").safe_dump(saved))
    assert loaded.segmentation.top_k == 0 and loaded.classifier.accumulate == 1
    assert loaded == config.load("demo")


def test_a_test_folder_only_previewed_then_dropped_leaves_prepare_and_infer_up_to_date(tmp_path):
    """`make -n TEST_DIR=other` rewrites the shared test manifest at parse time; back on the old folder,
    each experiment's inputs stamps take the time of the prepare and infer that ran under it. Had a step
    run under the other folder, its stamp stays newer than its output (it runs again)."""
    from pneumothorax import query

    processed, test_manifest = tmp_path / "p", manifest.path_for(tmp_path / "p", "test")
    manifest.write_if_changed(manifest.path_for(processed, "train"), {"files": [["a.dcm", 10, 1]]})
    manifest.write_if_changed(test_manifest, {"files": [["t1.dcm", 5, 1]]})
    os.utime(test_manifest, ns=(10**17, 10**17))
    exps = {name: paths.ExperimentDir(tmp_path / name) for name in ("a", "b")}

    def stamps(name: str) -> dict[str, int]:
        exp = exps[name]
        args = ["stamps", "--config", "tiny", "--exp-dir", str(exp.root), "--processed", str(processed)]
        assert query.main(args) == 0
        return {n: exp.stamp(n).stat().st_mtime_ns for n in manifest.STEP_INPUTS}

    def record_made(name: str, at: int) -> None:  # what Make does after prepare and infer
        for step in manifest.STEP_INPUTS:
            made = exps[name].made(step)
            made.write_text(exps[name].stamp(step).read_text())
            os.utime(made, ns=(at, at))

    # first written, the stamps take the manifests' time (what Make compared before they existed)
    train_time = manifest.path_for(processed, "train").stat().st_mtime_ns
    assert stamps("a") == {"inputs": max(train_time, 10**17), "test-inputs": 10**17}
    record_made("a", 2 * 10**17)
    manifest.write_if_changed(test_manifest, {"files": [["t2.dcm", 5, 2]]})  # make -n TEST_DIR=other
    assert all(t > 3 * 10**17 for t in stamps("a").values())
    stamps("b")
    record_made("b", 3 * 10**17)  # b ran prepare and infer under the other folder
    manifest.write_if_changed(test_manifest, {"files": [["t1.dcm", 5, 1]]})  # back on the old folder
    assert stamps("a") == {"inputs": 2 * 10**17, "test-inputs": 2 * 10**17}
    assert all(t > 3 * 10**17 for t in stamps("b").values())


def test_a_section_set_back_to_a_finished_runs_values_takes_that_runs_time(tmp_path):
    """A `make -n` of an edit, then the edit reverted: the runs made under the old values and inputs stay
    up to date (their stamps are not newer than them); runs of other values or inputs are not."""
    from pneumothorax import query, trainer

    exp, cfg, processed = paths.ExperimentDir(tmp_path / "demo"), config.load("demo"), tmp_path / "p"
    manifest.write_if_changed(manifest.path_for(processed, "train"), {"files": [["a.dcm", 10, 1]]})
    now_inputs = manifest.digest(processed)
    for k in range(3):
        run = exp.segmenter(k)
        run.root.mkdir(parents=True)
        run.model.write_bytes(b"weights")
        os.utime(run.model, ns=(10**17, 10**17))
    # what the trainer writes beside a finished model: these values and inputs, and these values on other inputs
    for k, inputs in ((0, now_inputs), (2, "an-older-manifest")):
        under = trainer.settings_for(cfg, "segmentation", cfg.seed + k, f"split-{k}", inputs).section
        exp.segmenter(k).trained_under.write_text(json.dumps(under))
    # a run from before trained_under.json: its config under 3 epochs
    exp.segmenter(1).config.write_text(config.dump(config.load("demo", ["segmentation.stages.1.epochs=3"])))
    (exp.root / "stamps").mkdir()
    # what Make records after the folds and search steps: the stamp each ran under, timed as its output
    exp.folds_made.write_text(query._stamp_text(cfg, "folds", now_inputs))
    exp.made("postprocess").write_text(query._stamp_text(cfg, "postprocess", None))
    for made in (exp.folds_made, exp.made("postprocess")):
        os.utime(made, ns=(2 * 10**17, 2 * 10**17))
    edited = tmp_path / "edited.yaml"
    edited.write_text(
        "defaults: [demo]\nsegmentation: {stages: [{size: 64}, {size: 64}]}\ndata: {area_bins: 3}\n"
        "postprocess: {r_th: [0]}\ninfer: {batch_size: 3}\n"
    )
    for name in (edited, "demo"):  # the edit, then the edit reverted
        assert (
            query.main(["stamps", "--config", str(name), "--exp-dir", str(exp.root), "--processed", str(processed)])
            == 0
        )
    times = {p.name: p.stat().st_mtime_ns for p in (exp.root / "stamps").iterdir()}
    assert times["segmentation-fold0.json"] == 10**17  # trained under these values and inputs
    assert times["segmentation-fold1.json"] > 2 * 10**17  # trained under 3 epochs: out of date
    assert times["segmentation-fold2.json"] > 2 * 10**17  # trained on other inputs: out of date
    assert times["folds.json"] == 2 * 10**17  # folds.made split under these values
    assert times["postprocess.json"] == 2 * 10**17  # searched under these values
    assert times["infer.json"] > 2 * 10**17  # no infer.made: never inferred
    assert times["classifier-fold0.json"] > 2 * 10**17  # never trained
    # a step that ran and kept its output (folds.csv unchanged, folds.made timed as it): its stamp,
    # unchanged since, takes the output's time, and the step is not run again at every make
    later = 3 * 10**17
    os.utime(exp.stamp("folds"), ns=(later, later))
    assert query.main(["stamps", "--config", "demo", "--exp-dir", str(exp.root), "--processed", str(processed)]) == 0
    assert exp.stamp("folds").stat().st_mtime_ns == 2 * 10**17
