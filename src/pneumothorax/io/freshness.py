"""What reruns: the one owner of "is this step's output up to date?".

An output is up to date when it exists, is newer than the files it is made from (Make compares their
times: a model and its split, the OOF maps and the models...), and was made under the values it would be
made under now: the config keys its step reads, and the inputs it reads (the input manifests of the
data, or the training inputs' digest). :data:`STEPS` is the table of those; each step :func:`record`\\ s
its values when it finishes (``models/<exp>/made/<step>.json``; a training run, its
``trained_under.json``), and :func:`stale_outputs` names every output whose record differs from now.
The Makefile makes those depend on ``FORCE`` and leaves everything else to file times.

So an edit reruns exactly the steps that read the edited keys; an edit set back (or one that only a
``make -n`` saw: nothing is written while Make plans) equals the record again and reruns nothing;
``compile``, ``data.workers`` or a YAML comment change no step's values. Standard library, YAML and
OmegaConf only (no torch): Make asks this once per run, in a fraction of a second.

Adding a step: a row in :data:`STEPS`, a rule in the Makefile, and a script that ends with
:func:`record` (``docs/maintaining.md``; a test checks that every step has its rule and its script).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pneumothorax.io import atomic, manifest
from pneumothorax.io import config as config_mod
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ExperimentDir, RunDir

TRAINING = ("seed", "deterministic", "data.channels", "data.n_folds", "data.use_extra", "data.clahe")
# Keys added after experiments were recorded without them: at this value a key is left out of the values, so
# those experiments stay up to date (the value they were made under); any other value is recorded and compared.
ADDED_LATER = {
    "data.clahe": 0.0,
    "segmentation.loss.lovasz": 0.0,
    "segmentation.loss.image": 0.0,
    "segmentation.loss.image_top": 1 / 256,
    "postprocess.gate_top": [0.0],
    "classifier.cpu_bf16": False,
    "segmentation.cpu_bf16": False,
    "split_seed": None,
}
_MISSING = object()


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: what its output depends on besides the files Make compares by time."""

    keys: tuple[str, ...]  # config keys (dotted) whose resolved values the output depends on
    manifests: tuple[str, ...] = ()  # input manifests whose exact text it depends on: "train", "test"
    train_digest: bool = False  # the training inputs' digest (files by name, size and time; label hashes)
    script: str = ""  # scripts/<script>.py runs it


STEPS: dict[str, Step] = {
    "prepare": Step(("data.sizes",), manifests=("train", "test"), script="01_prepare"),
    "folds": Step(("seed", "split_seed", "data.n_folds", "data.area_bins"), train_digest=True, script="02_folds"),
    "classifier": Step((*TRAINING, "classifier"), train_digest=True, script="03_train_classifier"),
    "segmentation": Step((*TRAINING, "segmentation"), train_digest=True, script="04_train_segmentation"),
    "oof": Step(("classifier.enabled", "infer.tta", "segmentation.oof_weights", "data.clahe"), script="05_predict_oof"),
    "infer": Step(("classifier.enabled", "infer", "data.clahe"), manifests=("test",), script="06_infer"),
    "search": Step(("classifier.enabled", "postprocess"), script="07_search_postprocess"),
}
"""The steps whose output depends on config values or input manifests. ``classifier`` and
``segmentation`` are recorded per training run (a fold, or the classifier's ``pretrain`` on an external
set, which reads no training inputs). ``compile`` and ``data.workers`` change speed, not results: no
step reads them."""


@dataclass(frozen=True)
class Inputs:
    """What the data holds now: the SHA-1 of each input manifest's text, and the training inputs' digest."""

    manifests: dict[str, str]  # "train", "test" -> SHA-1 of the manifest text ("none" without one)
    train_digest: str

    @classmethod
    def of_manifests(cls, content: dict[str, dict[str, Any]]) -> Inputs:
        """From manifests built in memory (:func:`pneumothorax.io.manifest.build`): what ``prepare`` will write."""
        hashes = {split: _sha1(manifest.text(content[split])) for split in manifest.SPLITS}
        return cls(hashes, manifest.digest_of(content["train"]))

    @classmethod
    def of_processed(cls, processed: Path) -> Inputs:
        """From the manifests ``prepare`` last wrote into ``processed`` (what the later steps read)."""
        return cls(manifest.hashes(processed), manifest.digest(processed))


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _lookup(value: Any, key: str) -> Any:
    for part in key.split("."):
        value = value[part]
    return value


def section(cfg: Config, step: str) -> dict[str, Any]:
    """The resolved config values step ``step`` reads (:data:`STEPS`), as a plain dict by dotted key.

    A segmenter whose encoder starts from the classifier (``encoder_init: classifier`` or ``pretrain``)
    reads the classifier's values too. The folds read ``seed`` only while ``split_seed`` is not set: runs of a
    seed ensemble on one split (``split_seed`` set, ``seed`` apart) share their folds.
    """
    if step not in STEPS:
        raise config_mod.ConfigError(f"unknown step {step!r}; steps: {sorted(STEPS)}")
    whole = config_mod.to_dict(cfg)
    keys = list(STEPS[step].keys)
    if step == "segmentation" and cfg.segmentation.encoder_init in ("classifier", "pretrain"):
        keys.append("classifier")
    if step == "folds" and cfg.split_seed is not None:
        keys.remove("seed")
    return _without_later_defaults({key: _lookup(whole, key) for key in keys})


def _without_later_defaults(found: dict[str, Any]) -> dict[str, Any]:
    """``found`` less every :data:`ADDED_LATER` key at its default, read as a key of its own (``data.clahe``) or
    inside a section read whole (``segmentation`` holds ``loss.lovasz``). ``found`` is :func:`section`'s own
    (``config.to_dict`` builds new dicts at each call), so it is edited in place."""
    for dotted, default in ADDED_LATER.items():
        if found.get(dotted, _MISSING) == default:
            del found[dotted]
            continue
        head, _, rest = dotted.partition(".")
        parent = found.get(head)
        *path, leaf = rest.split(".")
        for part in path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(leaf, _MISSING) == default:
            del parent[leaf]
    return found


def values(cfg: Config, step: str, inputs: Inputs | None, run: str = "") -> dict[str, Any]:
    """Everything step ``step``'s output depends on besides file times: its config values, and the
    manifests or the training inputs' digest it reads (``run="pretrain"``: a pre-training, no inputs)."""
    out = section(cfg, step)
    spec = STEPS[step]
    if inputs is not None and spec.manifests:
        out["inputs"] = {split: inputs.manifests[split] for split in spec.manifests}
    if inputs is not None and spec.train_digest and run != "pretrain":
        out["train_inputs"] = inputs.train_digest
    return out


def text(values: dict[str, Any]) -> str:
    """A record's content: the values as JSON, keys sorted (equal values, equal texts)."""
    return json.dumps(values, indent=1, sort_keys=True, default=str) + "\n"


def fingerprint(values: dict[str, Any]) -> str:
    """A short, stable hash of resolved values (key order and number spelling do not matter)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record(exp: ExperimentDir, step: str, cfg: Config, inputs: Inputs | None) -> None:
    """What step ``step``'s output was made under, written last by the step (atomically)."""
    atomic.write_text(exp.made(step), text(values(cfg, step, inputs)))


def _recorded(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def run_record(run: RunDir, step: str) -> str | None:
    """A finished run's record as :func:`text` of :func:`values` (``trained_under.json`` less its split, which
    Make follows as ``folds.csv``'s time); a run trained before these records, the config saved beside it."""
    try:
        if run.trained_under.exists():
            saved = json.loads(run.trained_under.read_text())
            return text({k: v for k, v in saved.items() if k != "split"})
        if run.config.exists():
            return text(section(config_mod.from_yaml(run.config.read_text()), step))
    except (config_mod.ConfigError, yaml.YAMLError, ValueError):  # an older schema: the run's own check decides
        return None
    return None


def training_runs(exp: ExperimentDir, cfg: Config) -> Iterator[tuple[str, str, RunDir]]:
    """(step, run name, run folder) of every training run: the classifier's folds (with a gate) and pre-training,
    the segmenter's folds."""
    if cfg.classifier.enabled:  # without a gate no rule builds its folds
        for k in range(cfg.data.n_folds):
            yield "classifier", f"fold{k}", exp.classifier(k)
    yield "classifier", "pretrain", exp.pretrain
    for k in range(cfg.data.n_folds):
        yield "segmentation", f"fold{k}", exp.segmenter(k)


def step_outputs(exp: ExperimentDir) -> list[tuple[str, Path]]:
    """(step, the output Make builds it as) of every step recorded in ``made/`` (training runs have their own)."""
    return [
        ("prepare", exp.prepared),
        ("folds", exp.folds),
        ("oof", exp.oof_summary),
        ("infer", exp.test_ids),
        ("search", exp.postprocess),
    ]


def stale_outputs(exp: ExperimentDir, cfg: Config, inputs: Inputs) -> list[Path]:
    """Every output that exists but was made under other values than now (Make reruns them)."""
    out = []
    for step, target in step_outputs(exp):
        if target.exists() and _recorded(exp.made(step)) != text(values(cfg, step, inputs)):
            out.append(target)
    for step, name, run in training_runs(exp, cfg):
        if run.model.exists() and run_record(run, step) != text(values(cfg, step, inputs, name)):
            out.append(run.model)
    return out


def ensemble_text(members: list[str], weights: str | None) -> str:
    """What an ensemble is made of: its members and weight mode."""
    return text({"members": members, "weights": weights})


def ensemble_is_stale(exp: ExperimentDir, members: list[str], weights: str) -> bool:
    """Whether ensemble ``exp`` exists but was built from other members or another weight mode."""
    try:
        built = json.loads(exp.ensemble.read_text())
    except (OSError, ValueError):
        return False
    was = ensemble_text([m["experiment"] for m in built.get("members", [])], built.get("weights_mode"))
    return was != ensemble_text(members, weights)
