"""``make ablation EXP=<exp>``: the recipe's components measured by the pipeline itself (2ST-UNet, Tables 7 and 10).

On one or more synthetic worlds and training seeds, the full recipe and the variants that train
differently (without SWA, one stage at the final size instead of two, without the positive
sampler) each run the whole pipeline through Make (so a rerun resumes and redoes nothing). The
variants that only change inference (without hflip TTA, without R-TH, without the gate, at B-TH
0.5) reuse the full recipe's trained folds (hard links) and redo only what they change: OOF maps
without TTA (``make oof``'s code), test inference, the search and the submission. Every variant gets its OOF score (the
competition metric at 1024 after its post-processing) and its test score against the world's
labels; ``models/<exp>/ablation/ablation.md`` and ``.csv`` give the mean and spread over runs and
the difference from the full recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pneumothorax.data import synthetic
from pneumothorax.io import atomic, tables
from pneumothorax.io import config as config_mod
from pneumothorax.io.config import Config
from pneumothorax.io.paths import ROOT, AblationDir, ExperimentDir, WorldDir
from pneumothorax.pipeline import search
from pneumothorax.post import submission
from pneumothorax.predict import infer, oof

TRAINING = ("full", "no_swa", "one_stage", "no_sampler")
INFERENCE = ("no_tta", "no_rth", "no_gate", "bth_0.5")


def training_overrides(cfg: Config, variant: str) -> dict[str, Any]:
    """What a training variant changes in the recipe (a YAML mapping over it)."""
    stages = config_mod.to_dict(cfg)["segmentation"]["stages"]
    if variant == "no_swa":
        stages = [{**s, "swa_epochs": 0} for s in stages]
    elif variant == "one_stage":
        stages = [{**stages[-1], "epochs": sum(s["epochs"] for s in stages)}]
    elif variant == "no_sampler":
        stages = [{**s, "positive_rate": None, "positive_rate_end": None} for s in stages]
    elif variant != "full":
        raise ValueError(f"unknown training variant {variant!r}; choose from {TRAINING}")
    return {"segmentation": {"stages": stages}}


def inference_overrides(variant: str) -> list[str]:
    """What an inference variant changes (dotted overrides)."""
    return {
        "no_tta": ["infer.tta=[]"],
        "no_rth": ["postprocess.r_th=[0]"],
        "no_gate": ["postprocess.gate=[0.0]"],
        "bth_0.5": ["postprocess.b_th={start: 0.5, stop: 0.5, step: 0.1}"],
    }[variant]


PIPELINE = ("prepare", "folds", "train", "infer", "search", "submit", "score")


def _make(
    world: WorldDir,
    name: str,
    configs: Path,
    quiet: bool,
    goals: tuple[str, ...] = PIPELINE,
    threads: int | None = None,
    prefix: str = "",
) -> None:
    """The pipeline of one config on one world, through Make (resumes; does nothing when done). With
    ``threads``, its torch jobs use that many threads (parallel runs would otherwise oversubscribe);
    with ``prefix``, each line of its output starts with it (parallel runs' lines interleave)."""
    args = [f"EXP={name}", f"CONFIGS={configs}", f"DATA_DIR={world.data}", f"PROCESSED_DIR={world.processed.root}"]
    args += [f"MODELS_DIR={world.models}", f"SUBMISSIONS_DIR={world.submissions}", f"LABELS={world.labels}"]
    command = ["make", "--no-print-directory", "-C", str(ROOT), *goals, *args, *(["QUIET=1"] if quiet else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    if not prefix:
        subprocess.run(command, check=True, env=env)
        return
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as job:
        for line in job.stdout or []:
            print(prefix + line, end="", flush=True)
    if job.returncode:
        raise subprocess.CalledProcessError(job.returncode, command)


def _link_files(source: ExperimentDir, target: ExperimentDir, keep: Callable[[Path], bool]) -> None:
    """Hard links in ``target`` to the files of ``source`` whose relative path ``keep`` accepts."""
    for path in source.root.rglob("*"):
        relative = path.relative_to(source.root)
        if path.is_dir() or path.suffix == ".lock" or not keep(relative):  # a shared lock would be one lock
            continue
        dest = target.root / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            os.link(path, dest)


def _link_training(source: ExperimentDir, target: ExperimentDir) -> None:
    """The trained folds of ``source`` in ``target`` as hard links (nothing is copied or retrained)."""
    skip = ("test", "report", "stamps", "made", "oof")
    _link_files(source, target, lambda rel: rel.parts[0] not in skip and len(rel.parts) > 1)
    shutil.copy(source.folds, target.folds)


def _reuse_classifier(full: ExperimentDir, target: ExperimentDir, n_folds: int) -> None:
    """A training variant's gate is the full recipe's at the same seed (the variants change only the
    segmentation section): its classifier folds as hard links, with the prepare and folds records and
    the split copied with their times, so that Make finds them up to date. A gate of other values would be set aside
    as stale and retrained, never reused."""
    if target.root.exists() or not all(full.classifier(k).model.exists() for k in range(n_folds)):
        return
    for step in ("prepare", "folds"):  # the records of the steps it shares, with their times
        target.made(step).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(full.made(step), target.made(step))
    shutil.copy2(full.folds, target.folds)
    _link_files(full, target, lambda rel: rel.parts[0] == "classifier")


def run_inference_variant(full: ExperimentDir, cfg: Config, variant: str, world: WorldDir) -> ExperimentDir:
    """An inference variant on the full recipe's trained folds: (OOF,) test inference, search, submission, score."""
    exp = world.exp(f"{full.name}-{variant}", cfg.final_size)
    if exp.score.exists():
        return exp
    _link_training(full, exp)
    if variant == "no_tta":  # OOF maps predicted again without the flip, as the test maps are
        oof.predict_oof(cfg, exp, world.processed, progress=False)
    else:
        _link_files(full, exp, lambda rel: rel.parts[0] == "oof")
    infer.infer_test(cfg, exp, world.processed, progress=False)
    search.search(cfg, exp, world.processed, progress=False)
    sub = world.submission(exp.name)
    submission.make_submission(exp, world.processed, sub, progress=False)
    atomic.write_json(exp.score, submission.score(sub, world.labels))
    return exp


def scores(exp: ExperimentDir) -> dict[str, float]:
    """The OOF score at 1024 after post-processing, and the test score."""
    post = json.loads(exp.postprocess.read_text())
    return {"oof": post["score_full_resolution"], "test": json.loads(exp.score.read_text())["score"]}


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per variant: mean and spread of the OOF and test scores over runs, and the mean difference from full."""
    frame = pd.DataFrame(rows)
    full = frame[frame["variant"] == "full"].set_index(["world", "seed"])
    frame["d_oof"] = frame.apply(lambda r: r["oof"] - full.loc[(r["world"], r["seed"]), "oof"], axis=1)
    frame["d_test"] = frame.apply(lambda r: r["test"] - full.loc[(r["world"], r["seed"]), "test"], axis=1)
    grouped = frame.groupby("variant", sort=False)
    out = pd.DataFrame(
        {
            "runs": grouped.size(),
            "oof_mean": grouped["oof"].mean(),
            "oof_std": grouped["oof"].std(ddof=0),
            "test_mean": grouped["test"].mean(),
            "test_std": grouped["test"].std(ddof=0),
            "d_oof": grouped["d_oof"].mean(),
            "d_test": grouped["d_test"].mean(),
        }
    )
    return out.round(4).reset_index()


def write(rows: list[dict[str, Any]], out: AblationDir, note: str) -> pd.DataFrame:
    """``runs.csv`` (every run), ``ablation.csv`` and ``ablation.md`` (the summary table)."""
    summary = table(rows)
    atomic.write_csv(out.runs, pd.DataFrame(rows))
    atomic.write_csv(out.table, summary)
    markdown = tables.markdown_table(summary.columns, summary.itertuples(index=False))
    atomic.write_text(out.summary, f"# Ablation\n\n{note}\n\n" + markdown)
    return summary


def variant_config(cfg: Config, base: Path, variant: str, seed: int, folder: Path) -> str:
    """Write the config of a training variant at a seed (``defaults: [the recipe]``); its name."""
    name = f"{cfg.name}-{variant}-s{seed}"
    body = {"defaults": [str(base.resolve())], "seed": seed, **training_overrides(cfg, variant)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text_if_changed(folder / f"{name}.yaml", yaml.safe_dump(body, sort_keys=False))
    return name


def make_world(world: WorldDir, n_train: int, n_test: int, difficulty: str) -> None:
    """The ablation's synthetic world (left alone when already written)."""
    knobs = synthetic.DIFFICULTIES[difficulty]
    spec = synthetic.WorldSpec(n_train=n_train, n_test=n_test, seed=world.seed, layout="stage2", **knobs)
    synthetic.make_world(world.data, spec, progress=False)


def seeds_note(worlds: list[int], seeds: list[int], n_train: int, difficulty: str) -> str:
    return (
        f"Synthetic worlds {worlds} ({n_train} training images, difficulty {difficulty}), training seeds {seeds}. "
        "`oof`: the competition metric at 1024 on the OOF images after the variant's post-processing; `test`: "
        "its submission against the world's labels; `d_*`: the mean difference from the full recipe."
    )


def _train_variants(
    cfg: Config, base: Path, out: AblationDir, w: int, seed: int, quiet: bool, threads: int | None
) -> list[dict[str, Any]]:
    """The training variants of one world and seed, in order (the full recipe first: the others reuse its gate)."""
    world, rows = out.world(w), []
    full_name = f"{cfg.name}-full-s{seed}"
    prefix = f"[world {w} seed {seed}] " if threads else ""  # only parallel runs share the terminal
    for variant in TRAINING:
        name = variant_config(cfg, base, variant, seed, out.configs)
        if cfg.classifier.enabled and variant != "full":
            _reuse_classifier(world.exp(full_name, cfg.final_size), world.exp(name, cfg.final_size), cfg.data.n_folds)
        _make(world, name, out.configs, quiet, threads=threads, prefix=prefix)
        rows.append({"world": w, "seed": seed, "variant": variant, **scores(world.exp(name, cfg.final_size))})
        print(f"world {w} seed {seed} {variant}: {rows[-1]}", flush=True)
    return rows


def _inference_variants(cfg: Config, out: AblationDir, w: int, seed: int) -> list[dict[str, Any]]:
    """The inference variants of one world and seed, on its full recipe's folds."""
    world, rows = out.world(w), []
    full_path = out.configs / f"{cfg.name}-full-s{seed}.yaml"
    full = world.exp(full_path.stem, cfg.final_size)
    for variant in INFERENCE:
        exp = run_inference_variant(full, config_mod.load(full_path, inference_overrides(variant)), variant, world)
        rows.append({"world": w, "seed": seed, "variant": variant, **scores(exp)})
        print(f"world {w} seed {seed} {variant}: {rows[-1]}", flush=True)
    return rows


def threads_per_job(jobs: int) -> int | None:
    """Torch threads for each of ``jobs`` parallel runs: the cores shared out (None: one run, the default)."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def run(
    cfg: Config,
    base: Path,
    out: AblationDir,
    worlds: list[int],
    seeds: list[int],
    world_size: tuple[int, int],
    difficulty: str = "default",
    quiet: bool = True,
    jobs: int = 1,
) -> pd.DataFrame:
    """Every variant on every world and seed; the summary table (also written under ``out``).

    The (world, seed) runs are independent, so ``jobs`` of them train at once, the cores shared out
    between them: on CPU, two single-thread trainings finish sooner than two two-thread ones in turn.
    Each world is prepared once, first, so that parallel runs never prepare it together."""
    runs = [(w, seed) for w in worlds for seed in seeds]
    for w in worlds:
        make_world(out.world(w), *world_size, difficulty)
        _make(out.world(w), variant_config(cfg, base, "full", seeds[0], out.configs), out.configs, quiet, ("prepare",))
    threads = threads_per_job(min(jobs, len(runs)))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        trained = list(pool.map(lambda r: _train_variants(cfg, base, out, *r, quiet, threads), runs))
    rows = []
    for (w, seed), training in zip(runs, trained, strict=True):  # in-process torch work: one run at a time
        rows += training + _inference_variants(cfg, out, w, seed)
    return write(rows, out, seeds_note(worlds, seeds, world_size[0], difficulty))
