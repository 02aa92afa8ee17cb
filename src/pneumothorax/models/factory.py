"""Models from names through registries: segmenters (smp) and classifiers (timm).

Encoder weights are ``imagenet`` (downloaded; users online), ``none``, or a local file.
With ``HF_HUB_OFFLINE=1`` a missing download fails at once with a message that says how to
supply the local file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from pneumothorax.io.config import ClassifierConfig, Config, ConfigError, SegmentationConfig
from pneumothorax.io.errors import WeightsError

SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "linknet": smp.Linknet,
}


def _offline_hint(what: str, key: str, exc: Exception) -> WeightsError:
    return WeightsError(
        f"could not obtain {what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
        f"Offline? Download the weights on a connected machine and set `{key}: /path/to/weights.pth` "
        f"(a state dict), or `{key}: none` to train from scratch."
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``); unwraps ``{'model': ...}`` and ``{'state_dict': ...}``."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _candidates(name: str) -> list[str]:
    """Source names that may hold target tensor ``name``: as is, under ``encoder.``/``model.``, or unwrapped.

    smp's native encoders name tensors as timm/torchvision do (``layer1.0.conv1.weight``);
    its timm-backed ``tu-`` encoders as ``model.<timm name>``.
    """
    names = [name, "encoder." + name, "model." + name]
    if name.startswith("model."):
        names.append(name[len("model.") :])
    return names


def transfer(target: nn.Module, source: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Copy every tensor of ``target`` that has a same-shaped match in ``source`` (see ``_candidates``).

    Returns a report: ``loaded`` and ``missing`` target names, ``unused`` source names.
    """
    own = target.state_dict()
    loaded, missing, used = [], [], set()
    for name, tensor in own.items():
        for key in _candidates(name):
            if key in source and source[key].shape == tensor.shape:
                own[name] = source[key].to(tensor.dtype)
                loaded.append(name)
                used.add(key)
                break
        else:
            missing.append(name)
    target.load_state_dict(own)
    return {"loaded": loaded, "missing": missing, "unused": sorted(set(source) - used)}


def _unknown(key: str, value: str, names: list[str], listing: str) -> ConfigError:
    close = difflib.get_close_matches(value, names, n=5)
    hint = f"; did you mean {close}?" if close else ""
    return ConfigError(f"{key}: {value!r} is not a known name{hint} (list them with {listing})")


def check_names(cfg: Config) -> None:
    """Check the encoder and classifier names against smp and timm (before any work starts).

    Raises:
        ConfigError: naming the key and the closest valid names.
    """
    encoder = cfg.segmentation.encoder
    timm_names = timm.list_models()
    if encoder.startswith("tu-"):
        if encoder[3:] not in timm_names:
            raise _unknown("segmentation.encoder", encoder, ["tu-" + n for n in timm_names], "timm.list_models()")
    elif encoder not in smp.encoders.get_encoder_names():
        names = smp.encoders.get_encoder_names()
        raise _unknown("segmentation.encoder", encoder, names, "smp.encoders.get_encoder_names(), or tu-<timm name>")
    if cfg.classifier.enabled and cfg.classifier.model not in timm_names:
        raise _unknown("classifier.model", cfg.classifier.model, timm_names, "timm.list_models()")


def create_segmenter(cfg: SegmentationConfig, in_channels: int) -> nn.Module:
    """Build the segmenter named by ``cfg.arch`` with encoder ``cfg.encoder``; one output logit map."""
    if cfg.arch not in SEGMENTERS:
        raise ValueError(f"unknown segmentation arch {cfg.arch!r}; choose one of {sorted(SEGMENTERS)}")
    weights = cfg.encoder_weights
    kwargs: dict[str, Any] = {"encoder_name": cfg.encoder, "in_channels": in_channels, "classes": 1}
    if cfg.arch in ("unet", "unetplusplus"):
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
        kwargs["encoder_depth"] = len(cfg.decoder_channels)
    remote = weights not in ("none", "") and not Path(weights).suffix
    try:
        model = SEGMENTERS[cfg.arch](encoder_weights=weights if remote else None, **kwargs)
    except (KeyError, ValueError) as exc:
        if "encoder" in str(exc).lower() or isinstance(exc, KeyError):
            raise ValueError(f"segmentation.encoder {cfg.encoder!r}: {exc}") from None
        raise
    except Exception as exc:  # network or hub errors
        raise _offline_hint(
            f"'{weights}' weights for encoder {cfg.encoder}", "segmentation.encoder_weights", exc
        ) from None
    if not remote and weights not in ("none", ""):
        report = transfer(model.encoder, load_state_dict_file(weights))
        if not report["loaded"]:
            raise WeightsError(f"{weights}: no tensor fits encoder {cfg.encoder}")
    return model


def create_classifier(cfg: ClassifierConfig, in_channels: int) -> nn.Module:
    """Build the timm classifier ``cfg.model`` with one output logit."""
    if cfg.model not in timm.list_models() and cfg.model not in timm.list_models(pretrained=True):
        raise ValueError(f"unknown classifier model {cfg.model!r} (not a timm model name)")
    weights = cfg.pretrained
    remote = weights not in ("none", "") and not Path(weights).suffix
    try:
        model = timm.create_model(cfg.model, pretrained=remote, num_classes=1, in_chans=in_channels)
    except Exception as exc:
        raise _offline_hint(f"'{weights}' weights for classifier {cfg.model}", "classifier.pretrained", exc) from None
    if not remote and weights not in ("none", ""):
        report = transfer(model, load_state_dict_file(weights))
        if not report["loaded"]:
            raise WeightsError(f"{weights}: no tensor fits classifier {cfg.model}")
    return model


def init_encoder_from_classifier(segmenter: nn.Module, classifier_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Initialise a segmenter's encoder from a classifier with the same backbone.

    Raises if any encoder tensor is left without a match (a different architecture); the
    decoder is not touched.
    """
    report = transfer(segmenter.encoder, classifier_state)
    if report["missing"]:
        raise WeightsError(
            f"classifier checkpoint does not fit the encoder: {len(report['missing'])} of "
            f"{len(report['missing']) + len(report['loaded'])} encoder tensors without a match, "
            f"e.g. {report['missing'][:3]}"
        )
    return report


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
