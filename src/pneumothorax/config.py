"""Experiment configs: YAML files with a base and overrides, loaded into frozen dataclasses.

An experiment file names its parents under ``defaults`` (``[base]`` by default for any file
but ``base.yaml``) and overrides keys; mappings merge deeply, lists replace. Unknown or
mistyped keys fail with their dotted path. ``load(name, overrides)`` also takes dotted
``key=value`` overrides (values parsed as YAML), as scripts get them from ``--set``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import paths


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# Registry names, checked when a config loads (the modules that own each registry test that
# their keys are exactly these): a typo fails at once, listing the valid names.
Arch = Literal["unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet"]
AugmentGroup = Literal["A1", "A2", "A3", "A4", "CLAHE"]
TTAView = Literal["hflip", "vflip", "hvflip"]
Weights = Literal["best", "last", "swa"]


@dataclass(frozen=True)
class DataConfig:
    """Caches and loading."""

    sizes: tuple[int, ...] = (256, 512, 1024)  # cache sizes that `make prepare` builds
    channels: int = 3  # 1 = grayscale input; 3 = the gray image repeated (ImageNet encoders)
    workers: int | Literal["auto"] = 4  # DataLoader workers; auto: this process's share of the cores
    n_folds: int = 5
    area_bins: int = 4  # mask-area quantile bins for fold stratification


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (BCE + Dice by default; focal optional)."""

    bce: float = 1.0
    dice: float = 1.0
    focal: float = 0.0
    focal_gamma: float = 2.0


@dataclass(frozen=True)
class StageConfig:
    """One resolution stage of segmentation training."""

    size: int = 256
    epochs: int = 35
    batch_size: int = 40
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    scheduler: Literal["cosine", "plateau", "constant"] = "cosine"
    plateau_factor: float = 0.2
    plateau_patience: int = 5
    swa_epochs: int = 0  # average the weights of the last N epochs (0 = no SWA)
    swa_lr: float | None = None  # constant LR during SWA epochs (None: keep the schedule)
    positive_rate: float | None = None  # share of positives per epoch (None: natural sampling)
    positive_rate_end: float | None = None  # linearly towards this by the stage's last epoch
    augment: tuple[AugmentGroup, ...] = ("A1",)
    augment_p: float = 0.5


@dataclass(frozen=True)
class SegmentationConfig:
    """The per-fold segmenter."""

    arch: Arch = "unet"
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"  # imagenet | none | path to a local encoder state dict
    encoder_init: str = "none"  # none | classifier (this fold's classifier) | pretrain (external) | path
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    amp: Literal["none", "bf16", "fp16"] = "bf16"  # on CUDA only
    channels_last: bool = True  # on CUDA only
    grad_clip: float = 0.0
    sync_bn: bool = False  # DDP: batch-norm statistics over the global batch
    swa_bn_images: int = 2048  # SWA batch-norm statistics from at most this many training images (0: all)
    oof_weights: Weights = "swa"


@dataclass(frozen=True)
class ClassifierConfig:
    """The image-level gate (and optional source of encoder pre-training)."""

    enabled: bool = True
    model: str = "legacy_xception"  # any timm model name
    pretrained: str = "imagenet"  # imagenet | none | path to a local timm checkpoint
    size: int = 512
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    augment_p: float = 0.7  # probability of each aggressive augmentation (flip, zoom, CLAHE)
    positive_rate: float | None = None  # balanced sampling: share of positives per epoch (None: natural)
    threshold: float = 0.5  # for the metrics.json summary; the gate itself is searched
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    channels_last: bool = True
    external_csv: str = "none"  # CSV (path,label) of an external weakly-labelled set for `make pretrain`


@dataclass(frozen=True)
class InferConfig:
    """Test-time inference."""

    tta: tuple[TTAView, ...] = ("hflip",)  # any of hflip, vflip, hvflip (the identity is always used)
    weights: Weights = "swa"
    batch_size: int = 16


@dataclass(frozen=True)
class Grid:
    """An inclusive arithmetic range."""

    start: float = 0.2
    stop: float = 0.9
    step: float = 0.001

    def values(self) -> list[float]:
        """The grid's values, rounded to the step's decimals."""
        n = int(round((self.stop - self.start) / self.step)) + 1
        return [round(self.start + i * self.step, 10) for i in range(n)]


@dataclass(frozen=True)
class PostprocessConfig:
    """The post-processing grid searched on out-of-fold predictions."""

    b_th: Grid = field(default_factory=Grid)
    r_th: tuple[int, ...] = (0, 1024, 2048, 3072, 4096)
    gate: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    min_component: tuple[int, ...] = (0,)  # remove components smaller than this (1024x1024 pixels)
    triplet: bool = False
    triplet_top: tuple[float, ...] = (0.6, 0.7, 0.75, 0.8)
    triplet_area: tuple[int, ...] = (1024, 2048, 3072, 4096)
    triplet_bottom: tuple[float, ...] = (0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Config:
    """One experiment."""

    name: str = "base"
    seed: int = 42
    deterministic: bool = False  # torch's deterministic kernels (slower on GPU); false: cuDNN benchmark
    compile: bool = False  # torch.compile the training model (a slow first step; see bench-train)
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)


# --- building dataclasses from dicts, strictly -------------------------------------------
def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; or ".join(errors) if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of the valid names {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return "none"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


# --- files --------------------------------------------------------------------------------
def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_path(name: str | Path, config_dir: Path = paths.CONFIGS) -> Path:
    """A config name (``demo``) or a path (``configs/demo.yaml``) -> the YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    for folder in dict.fromkeys([config_dir, paths.CONFIGS]):  # beside the child first, then configs/
        candidate = folder / f"{name}.yaml"
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in config_dir.glob("*.yaml"))
    raise ConfigError(f"config {name!r} not found; known experiments: {known}")


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"{path}: circular defaults")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parents = data.pop("defaults", None if path.stem == "base" else ["base"]) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, _read(resolve_path(parent, path.parent), (*seen, path)))
    return _merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (YAML values; ``stages.1.epochs`` indexes lists)."""
    data = _merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: no list item {part!r}")
                if last:
                    node[int(part)] = value
                else:
                    node[int(part)] = dict(node[int(part)]) if isinstance(node[int(part)], dict) else node[int(part)]
                    node = node[int(part)]
            else:
                if last:
                    node[part] = value
                else:
                    child = node.get(part, {})
                    child = list(child) if isinstance(child, list) else dict(child)
                    node[part] = child
                    node = child
    return data


def load(name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load an experiment by name or path, with optional ``key=value`` overrides."""
    path = resolve_path(name)
    data = _read(path)
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides)
    try:
        return build(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dump(config: Config) -> str:
    """The resolved config as YAML (what is saved beside every checkpoint)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_yaml(text: str) -> Config:
    """Rebuild a config from :func:`dump`'s text."""
    data = yaml.safe_load(text)
    data.pop("defaults", None)
    return build(Config, data)
