"""Configs: shipped recipes load, typos fail with their key, the resolved config round-trips."""

from __future__ import annotations

import pytest

from pneumothorax.io import config, paths

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
    # their public configs: combo loss (3, 1, 4), clipping 0.1, 3 checkpoints averaged, rate 0.8 -> 0.4, no SWA
    seg = first.segmentation
    assert (seg.loss.bce, seg.loss.dice, seg.loss.focal, seg.grad_clip, seg.top_k) == (3.0, 1.0, 4.0, 0.1, 3)
    assert (seg.stages[0].positive_rate, seg.stages[-1].positive_rate_end) == (0.8, 0.4)
    assert all(s.swa_epochs == 0 for s in seg.stages) and seg.stages[1].freeze_encoder_epochs > 0
    assert (0.75, 2000, 0.3) in {
        (t, a, b)
        for t in first.postprocess.triplet_top
        for a in first.postprocess.triplet_area
        for b in first.postprocess.triplet_bottom
    }  # their best validation triplet


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
    with pytest.raises(config.ConfigError, match="data.clahe: -1"):
        config.load("demo", ["data.clahe=-1"])
    for top in ("0", "1.5"):
        with pytest.raises(config.ConfigError, match=f"segmentation.loss.image_top: {float(top)}"):
            config.load("demo", [f"segmentation.loss.image_top={top}"])
    assert config.load("demo", ["segmentation.loss.image_top=1"]).segmentation.loss.image_top == 1.0


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


def test_weights_that_training_will_not_write_fail_at_load():
    with pytest.raises(config.ConfigError, match="infer.weights: topk needs segmentation.top_k"):
        config.load("demo", ["infer.weights=topk"])
    with pytest.raises(config.ConfigError, match="segmentation.oof_weights: ema needs segmentation.ema_decay"):
        config.load("demo", ["segmentation.oof_weights=ema"])
    with pytest.raises(config.ConfigError, match="classifier.weights: topk needs classifier.top_k"):
        config.load("demo", ["classifier.weights=topk", "segmentation.top_k=3"])  # the segmenter's top_k is not its
    with pytest.raises(config.ConfigError, match="classifier.weights: ema needs classifier.ema_decay"):
        config.load("demo", ["classifier.weights=ema", "segmentation.ema_decay=0.9"])
    with pytest.raises(config.ConfigError, match="classifier.weights.*valid names"):
        config.load("demo", ["classifier.weights=swa"])  # the classifier has no SWA stage
    first = config.load("1st_place")
    assert (first.segmentation.top_k, first.segmentation.oof_weights, first.infer.weights) == (3, "topk", "topk")


def test_a_config_saved_before_new_keys_still_loads_with_their_defaults():
    saved = config.to_dict(config.load("demo"))
    del saved["segmentation"]["top_k"], saved["classifier"]["accumulate"]  # keys a newer base.yaml added
    loaded = config.from_yaml(__import__("yaml").safe_dump(saved))
    assert loaded.segmentation.top_k == 0 and loaded.classifier.accumulate == 1
    assert loaded == config.load("demo")
