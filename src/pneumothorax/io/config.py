"""Experiment configs: YAML files over ``configs/base.yaml``, merged by OmegaConf, frozen into dataclasses.

An experiment file names its parents under ``defaults`` (``[base]`` by default for any file
but ``base.yaml``) and overrides keys; mappings merge deeply, lists replace (OmegaConf's
merge). ``load(name, overrides)`` also takes dotted ``key=value`` overrides (values parsed as
YAML; ``segmentation.stages.1.epochs=2`` indexes lists), as scripts get them from ``--set``.
Values may interpolate others (``size: ${data.sizes.0}``).

**One source of defaults:** ``base.yaml`` holds every key of every section; the section
dataclasses have no defaults, so a key missing from the chain fails with its dotted name. Only
the items of lists (a segmentation stage) and small values (a threshold grid) have defaults
here, since YAML cannot give each list item defaults. Unknown or mistyped keys fail with their
dotted name, and registry names (``Literal`` types) list the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pneumothorax.io import paths
from pneumothorax.io.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# Registry names, checked when a config loads (the modules that own each registry test that
# their keys are exactly these): a typo fails at once, listing the valid names.
Arch = Literal["unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet"]
AugmentGroup = Literal["A1", "A2", "A3", "A4", "CLAHE", "SSR"]
TTAView = Literal["hflip", "vflip", "hvflip"]
Weights = Literal["best", "last", "swa", "topk", "ema"]
GateWeights = Literal["best", "last", "topk", "ema"]  # the classifier has no SWA


@dataclass(frozen=True)
class DataConfig:
    """Caches and loading."""

    sizes: tuple[int, ...]  # cache sizes that `make prepare` builds
    channels: int  # 1 = grayscale input; 3 = the gray image repeated (ImageNet encoders)
    workers: int | Literal["auto"]  # DataLoader workers; auto: this process's share of the cores
    n_folds: int
    area_bins: int  # mask-area quantile bins for fold stratification
    use_extra: bool  # train on the layout's extra images (EXTRA_DIR) when it has some
    clahe: float = 0.0  # CLAHE clip limit on every image the models see, trained or predicted (0 = off)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (BCE + Dice by default; focal optional)."""

    bce: float
    dice: float
    focal: float
    focal_gamma: float
    lovasz: float = 0.0  # Lovasz hinge, per image
    image: float = 0.0  # BCE of each image's label against the mean of its map's top logits
    image_top: float = 1 / 256  # the fraction of each map's pixels that mean reads


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
    accumulate: int = 1  # gradient accumulation: an optimiser step every k batches (effective batch x k)
    freeze_encoder_epochs: int = 0  # the stage's first N epochs leave the encoder's weights as they are
    positive_rate: float | None = None  # share of positives per epoch (None: natural sampling)
    positive_rate_end: float | None = None  # linearly towards this by the stage's last epoch
    epoch_images: int | None = None  # each epoch draws this many images (in the positive rate) instead of all
    augment: tuple[AugmentGroup, ...] = ("A1",)
    augment_p: float = 0.5
    # validate after every Nth epoch and the stage's last (1: every epoch). Training is the same either way
    # (validation draws no random number the training uses); best/top-k pick among the validated epochs.
    validate_every: int = 1


@dataclass(frozen=True)
class SegmentationConfig:
    """The per-fold segmenter."""

    arch: Arch
    encoder: str
    encoder_weights: str  # imagenet | none | path to a local encoder state dict
    encoder_init: str  # none | classifier (this fold's classifier) | pretrain (external) | path
    decoder_channels: tuple[int, ...]
    loss: LossConfig
    stages: tuple[StageConfig, ...]
    amp: Literal["none", "bf16", "fp16"]  # on CUDA only
    channels_last: bool  # the model and its inputs in channels_last, on CPU too (faster there: make bench-train)
    cpu_bf16: bool  # bf16 autocast of the training steps on a CPU with avx512_bf16 or AMX, else fp32 (make bench-train)
    grad_clip: float
    sync_bn: bool  # DDP: batch-norm statistics over the global batch
    swa_bn_images: int  # SWA batch-norm statistics from at most this many training images (0: all)
    top_k: int  # keep the k best epochs of the final stage; weights "topk" averages them (1st place: 3)
    ema_decay: float  # an exponential moving average of the weights at every step (0: off); weights "ema"
    oof_weights: Weights


@dataclass(frozen=True)
class ClassifierConfig:
    """The image-level gate (and optional source of encoder pre-training)."""

    enabled: bool
    model: str  # any timm model name
    pretrained: str  # imagenet | none | path to a local timm checkpoint
    size: int
    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    weight_decay: float
    accumulate: int  # gradient accumulation: an optimiser step every k batches (effective batch x k)
    augment_p: float  # probability of each aggressive augmentation (flip, zoom, CLAHE)
    positive_rate: float | None  # balanced sampling: share of positives per epoch (None: natural)
    epoch_images: int | None  # each epoch draws this many images (in the positive rate) instead of all
    threshold: float  # for the metrics.json summary; the gate itself is searched
    top_k: int  # keep the k best epochs (by validation AUC); weights "topk" averages them
    ema_decay: float  # an exponential moving average of the weights at every step (0: off); weights "ema"
    weights: GateWeights  # the weights that become model.pt: the gate of the OOF and test predictions
    amp: Literal["none", "bf16", "fp16"]
    channels_last: bool
    cpu_bf16: bool
    external_csv: str  # CSV (path,label) of an external weakly-labelled set for `make pretrain`


@dataclass(frozen=True)
class LoggingConfig:
    """Experiment tracking (speed and results unchanged: no step reads it)."""

    backend: Literal["csv", "tensorboard", "mlflow"]  # metrics.csv alone, or also TensorBoard or MLflow
    mlflow_uri: str  # MLflow tracking URI; "" = the local file store models/mlruns


@dataclass(frozen=True)
class InferConfig:
    """Test-time inference."""

    tta: tuple[TTAView, ...]  # any of hflip, vflip, hvflip (the identity is always used)
    weights: Weights
    batch_size: int


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

    b_th: Grid
    r_th: tuple[int, ...]
    gate: tuple[float, ...]
    gate_blend: tuple[float, ...]  # weights of the map's peak probability in the gate score (0: the classifier's)
    gate_top: tuple[float, ...]  # the peak: the mean of the map's highest fraction of pixels (0: the highest pixel)
    min_component: tuple[int, ...]  # remove components smaller than this (1024x1024 pixels)
    triplet: bool
    triplet_top: tuple[float, ...]
    triplet_area: tuple[int, ...]
    triplet_bottom: tuple[float, ...]


@dataclass(frozen=True)
class Config:
    """One experiment."""

    name: str
    seed: int
    split_seed: int | None  # the folds' seed (None: seed): runs that differ in seed alone can share one split
    deterministic: bool  # torch's deterministic kernels (slower on GPU); false: cuDNN benchmark
    compile: bool  # torch.compile the training model (a slow first step; see bench-train)
    data: DataConfig
    classifier: ClassifierConfig
    segmentation: SegmentationConfig
    logging: LoggingConfig
    infer: InferConfig
    postprocess: PostprocessConfig

    @property
    def fold_seed(self) -> int:
        """The seed of the patient split: ``split_seed``, or ``seed`` when it is not set."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def final_size(self) -> int:
        """The last segmentation stage's size: out-of-fold and test maps are at it."""
        return self.segmentation.stages[-1].size


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two section dicts (what to tell a user who edited a config)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, where = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, where + "."))
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")
    return out


# --- building dataclasses from plain containers, strictly ---------------------------------
def _coerce_dataclass(tp: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return build(tp, value, where)


def _coerce_union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError("; or ".join(errors) if errors else f"{where}: bad value {value!r}")


def _coerce_literal(args: tuple[Any, ...], value: Any, where: str) -> Any:
    if value not in args:
        raise ConfigError(f"{where}: {value!r} is not one of the valid names {list(args)}")
    return value


def _coerce_tuple(args: tuple[Any, ...], value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))


def _coerce_scalar(tp: type, value: Any, where: str) -> Any:
    """bool, int, float (an int is a float) or str (YAML's null is the string ``none``)."""
    if tp is str and value is None:
        return "none"
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[tp]
    wrong_bool = isinstance(value, bool) and tp is not bool
    if wrong_bool or not isinstance(value, accepted):
        kind = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[tp]
        raise ConfigError(f"{where}: expected {kind}, got {value!r}")
    return float(value) if tp is float else value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _coerce_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, where)
    if origin is Literal:
        return _coerce_literal(args, value, where)
    if origin is tuple:
        return _coerce_tuple(args, value, where)
    if tp in (bool, int, float, str):
        return _coerce_scalar(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown, missing and mistyped keys raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {sorted(names)}")
    no_default = dataclasses.MISSING
    missing = [
        f.name for f in fields if f.name not in data and f.default is no_default and f.default_factory is no_default
    ]
    if missing:
        key = f"{where}.{missing[0]}" if where else missing[0]
        raise ConfigError(f"missing config key '{key}' (configs/base.yaml gives every key)")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


# --- files ----------------------------------------------------------------------------------
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


def sources(name: str | Path) -> list[Path]:
    """The YAML files an experiment reads, parents first."""
    out: list[Path] = []
    _read(resolve_path(name), (), out)
    return out


def _read(path: Path, seen: tuple[Path, ...] = (), read: list[Path] | None = None) -> DictConfig:
    """One file merged over its ``defaults`` chain (OmegaConf: mappings merge, lists replace)."""
    if path in seen:
        raise ConfigError(f"{path}: circular defaults")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parents = data.pop("defaults", None if path.stem == "base" else ["base"]) or []
    merged = OmegaConf.create({})
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = OmegaConf.merge(merged, _read(resolve_path(parent, path.parent), (*seen, path), read))
    if read is not None and path not in read:
        read.append(path)
    return OmegaConf.merge(merged, OmegaConf.create(data))


def apply_overrides(node: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Apply ``a.b.c=value`` overrides (YAML values; ``stages.1.epochs`` indexes lists) in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            OmegaConf.update(node, key.strip(), yaml.safe_load(raw), merge=True)
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise ConfigError(f"override {key!r}: {str(exc).splitlines()[0]}") from None
    return node


def load(name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load an experiment by name or path, with optional ``key=value`` overrides."""
    path = resolve_path(name)
    node = apply_overrides(_read(path), overrides)
    if "name" not in node:
        node["name"] = path.stem
    try:
        data = OmegaConf.to_container(node, resolve=True)
        return check(build(Config, data))
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check(cfg: Config) -> Config:
    """Settings that contradict each other fail at load, not after training."""
    seg = cfg.segmentation
    if cfg.compile and seg.sync_bn:
        raise ConfigError(
            "compile: true with segmentation.sync_bn: true is unsupported upstream (torch.compile does not trace "
            "SyncBatchNorm's collectives): turn one of them off"
        )
    for i, stage in enumerate(seg.stages):
        if stage.validate_every < 1 or (stage.validate_every > 1 and stage.scheduler == "plateau"):
            raise ConfigError(
                f"segmentation.stages[{i}].validate_every: {stage.validate_every} (a plateau schedule steps on every "
                "epoch's validation: use 1; otherwise 1 or more)"
            )
    if cfg.data.clahe < 0:
        raise ConfigError(f"data.clahe: {cfg.data.clahe} (a CLAHE clip limit: 0 = off, else above 0; 2 is usual)")
    if not all(0.0 <= w <= 1.0 for w in cfg.postprocess.gate_blend) or not cfg.postprocess.gate_blend:
        raise ConfigError(f"postprocess.gate_blend: {list(cfg.postprocess.gate_blend)} (weights between 0 and 1)")
    if not all(0.0 <= f < 1.0 for f in cfg.postprocess.gate_top) or not cfg.postprocess.gate_top:
        raise ConfigError(f"postprocess.gate_top: {list(cfg.postprocess.gate_top)} (fractions of a map: 0 to below 1)")
    if not 0.0 < seg.loss.image_top <= 1.0:
        raise ConfigError(
            f"segmentation.loss.image_top: {seg.loss.image_top} (a fraction of each map: above 0, at most 1)"
        )
    _check_weights("segmentation", seg.top_k, seg.ema_decay, ("oof_weights", seg.oof_weights))
    _check_weights("segmentation", seg.top_k, seg.ema_decay, ("infer.weights", cfg.infer.weights))
    c = cfg.classifier
    _check_weights("classifier", c.top_k, c.ema_decay, ("weights", c.weights))
    return cfg


def _check_weights(section: str, top_k: int, ema_decay: float, named: tuple[str, str]) -> None:
    """Weights ``topk`` or ``ema`` need the section's ``top_k`` or ``ema_decay`` to make them."""
    key, weights = named
    key = key if "." in key else f"{section}.{key}"
    if weights == "topk" and top_k < 1:
        raise ConfigError(f"{key}: topk needs {section}.top_k of 1 or more (it is {top_k})")
    if weights == "ema" and not 0 < ema_decay < 1:
        raise ConfigError(f"{key}: ema needs {section}.ema_decay between 0 and 1 (it is {ema_decay})")


def dump(config: Config) -> str:
    """The resolved config as YAML (what is saved beside every checkpoint)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_yaml(text: str) -> Config:
    """Rebuild a config from :func:`dump`'s text (a config saved beside a checkpoint). Keys added to
    ``base.yaml`` since it was saved take their defaults, which keep the old behaviour."""
    data = yaml.safe_load(text)
    data.pop("defaults", None)
    merged = OmegaConf.merge(_read(resolve_path("base")), OmegaConf.create(data))
    return build(Config, OmegaConf.to_container(merged, resolve=True))
