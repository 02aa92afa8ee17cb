"""Model registry, offline weights, local weight files and encoder initialisation from a classifier."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from pneumothorax.io import config
from pneumothorax.models import factory


@pytest.fixture(scope="module")
def demo():
    return config.load("demo")


def test_offline_imagenet_fails_fast_with_a_hint(demo):
    seg = replace(demo.segmentation, encoder="resnet18", encoder_weights="imagenet")
    started = time.time()
    with pytest.raises(factory.WeightsError, match="segmentation.encoder_weights: /path/to/weights.pth"):
        factory.create_segmenter(seg, 3)
    cls = replace(demo.classifier, model="resnet10t", pretrained="imagenet")
    with pytest.raises(factory.WeightsError, match="classifier.pretrained"):
        factory.create_classifier(cls, 3)
    assert time.time() - started < 20


def test_unknown_names_list_choices(demo):
    with pytest.raises(ValueError, match="choose one of"):
        factory.create_segmenter(replace(demo.segmentation, arch="segformer9"), 1)
    with pytest.raises(ValueError, match="not a timm model"):
        factory.create_classifier(replace(demo.classifier, model="xceptionnn"), 1)


@pytest.mark.parametrize("arch", ["unet", "fpn", "deeplabv3plus"])
def test_architectures_forward(demo, arch):
    seg = replace(demo.segmentation, arch=arch, encoder="resnet18")
    model = factory.create_segmenter(seg, 1).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_local_encoder_weights_file(demo, tmp_path):
    seg = replace(demo.segmentation, encoder="resnet18")
    source = factory.create_segmenter(seg, 3)
    torch.save({"state_dict": source.encoder.state_dict()}, tmp_path / "enc.pth")
    loaded = factory.create_segmenter(replace(seg, encoder_weights=str(tmp_path / "enc.pth")), 3)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    with pytest.raises(factory.WeightsError, match="not found"):
        factory.create_segmenter(replace(seg, encoder_weights=str(tmp_path / "nope.pth")), 3)


@pytest.mark.parametrize(("cls_name", "encoder"), [("resnet10t", "tu-resnet10t"), ("resnet18", "resnet18")])
def test_encoder_init_from_classifier(demo, cls_name, encoder):
    classifier = factory.create_classifier(replace(demo.classifier, model=cls_name), 1)
    seg = factory.create_segmenter(replace(demo.segmentation, encoder=encoder), 1)
    decoder_before = {k: v.clone() for k, v in seg.state_dict().items() if not k.startswith("encoder.")}
    cls_state = classifier.state_dict()

    def counterpart(name):
        return cls_state[name[len("model.") :] if name.startswith("model.") else name]

    weights = [n for n, t in seg.encoder.state_dict().items() if t.dtype.is_floating_point and t.dim() == 4]
    assert not any(torch.equal(seg.encoder.state_dict()[n], counterpart(n)) for n in weights)  # random before
    report = factory.init_encoder_from_classifier(seg, cls_state)
    encoder_state = seg.encoder.state_dict()
    assert report["missing"] == [] and len(report["loaded"]) == len(encoder_state)
    for name, tensor in encoder_state.items():
        assert torch.equal(tensor, counterpart(name)), name
    assert all(name.split(".")[0] in ("fc", "head", "classifier") for name in report["unused"])  # the head only
    for name, tensor in seg.state_dict().items():
        if not name.startswith("encoder."):
            assert torch.equal(tensor, decoder_before[name]), name  # decoder untouched


def test_encoder_init_rejects_other_architecture(demo):
    classifier = factory.create_classifier(replace(demo.classifier, model="resnet10t"), 1)
    seg = factory.create_segmenter(replace(demo.segmentation, encoder="resnet18"), 1)
    with pytest.raises(factory.WeightsError):
        factory.init_encoder_from_classifier(seg, classifier.state_dict())
