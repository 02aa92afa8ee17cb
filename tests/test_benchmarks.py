"""The benchmarks' probes still run against the package (a probe that drifts from the API breaks `make bench`)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumothorax.io import config, paths
from pneumothorax.post.exact_search import OOFPart

sys.path.insert(0, str(paths.ROOT / "benchmarks"))
import bench_real  # noqa: E402  (a script folder, not a package)
import gpu_check  # noqa: E402
import stacked_gate  # noqa: E402


@pytest.mark.trains
def test_memory_probe_submits_one_row_per_test_map() -> None:
    probe = paths.ROOT / "benchmarks" / "memory_probe.py"
    result = subprocess.run([sys.executable, str(probe), "12"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["images"] == 12 and figures["rows"] == 12
    assert 0 < figures["peak_after_infer_mb"] <= figures["peak_rss_mb"] and figures["rle_mb"] > 0


def test_gpu_check_ddp_script_accumulates_like_plain_training(tmp_path) -> None:
    """gpu-check's one-rank DDP script, run here on gloo: no_sync then a synced half-batch gives plain accumulation's
    gradients (the GPU run found the script itself calling no_sync on the bare model that one rank trains)."""
    out = gpu_check._torchrun(1, gpu_check.DDP_SCRIPT, tmp_path, "cpu")
    assert float(out.split("GAP")[-1]) < 1e-6


def _staged(root: Path, n_patients: int = 28) -> tuple[pd.DataFrame, dict[str, str]]:
    """A folder as stage.sh writes it: two DICOMs per patient (a third of the patients positive, one image with two
    label rows), and one extra positive per patient (JPEG for even patients, PNG with its mask for odd ones)."""
    rows, patients = [], {}
    for p in range(n_patients):
        for k in range(2):
            image_id = f"1.2.276.0.{p}.{k}"
            patients[image_id] = f"{p:08d}_{k:03d}.png"
            (root / "dicom-images-train").mkdir(parents=True, exist_ok=True)
            (root / "dicom-images-train" / f"{image_id}.dcm").write_bytes(image_id.encode())
            runs = [f"{100 * p + 7} {5 + k}"] if p % 3 == 0 else ["-1"]
            rows += [(image_id, r) for r in runs + ([f"{9000 + p} 3"] if p == 3 and k == 1 else [])]
    labels = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"])
    labels.to_csv(root / "stage_2_train.csv", index=False)
    extra = [(f"1.2.276.9.{p}", f"{50 * p} 4") for p in range(n_patients)]
    for p, (image_id, _) in enumerate(extra):
        patients[image_id] = f"{p:08d}_{9:03d}.png"
        for folder in ("jpg",) if p % 2 == 0 else ("png", "mask"):
            (root / "extra-positives" / folder).mkdir(parents=True, exist_ok=True)
            suffix = ".jpg" if folder == "jpg" else ".png"
            (root / "extra-positives" / folder / f"{image_id}{suffix}").write_bytes(b"x")
    pd.DataFrame(extra, columns=["ImageId", "EncodedPixels"]).to_csv(
        root / "extra-positives" / "labels.csv", index=False
    )
    return labels, patients


def test_bench_real_holds_out_whole_patients_and_renames_them_as_stage_2_test_images(tmp_path, monkeypatch) -> None:
    """make bench-real's data folder: every DICOM once, in training or in the held-out test set, never one patient in
    both; the test set's label rows exactly, under the ID_<9 hex> names of today's download; no extra positive of a
    test patient among the training images."""
    staged, out = tmp_path / "staged", tmp_path / "bench"
    labels, patients = _staged(staged)
    patient_map = tmp_path / "kaggle-to-nih-id.csv"
    pd.DataFrame({"Kaggle_ID": list(patients), "NIH_ID": list(patients.values())}).to_csv(patient_map, index=False)
    monkeypatch.setattr(paths, "PATIENT_MAP", patient_map)
    counts = bench_real.build_layout(staged, out, seed=0)

    test_files = sorted((out / "stage_2_images").glob("*.dcm"))
    train_files = sorted((out / "dicom-images-train").glob("*.dcm"))
    sources = [f.resolve().read_bytes().decode() for f in test_files + train_files]
    assert sorted(sources) == sorted(labels["ImageId"].unique())  # every DICOM once
    test_ids = {f.resolve().read_bytes().decode(): f.stem for f in test_files}
    assert counts == {"train": 56 - len(test_ids), "test": len(test_ids), "extra": 28 - len(test_ids) // 2}
    assert 56 // 7 - 2 <= len(test_ids) <= 56 // 7 + 2 and all(len(test_ids) != n for n in (0, 56))
    nih = {i: patients[i].split("_")[0] for i in patients}
    assert not {nih[i] for i in test_ids} & {nih[f.stem] for f in train_files}  # whole patients held out
    assert any(labels.loc[labels["ImageId"].isin(test_ids), "EncodedPixels"] != "-1")  # positives held out too
    for image_id, name in test_ids.items():
        assert name == "ID_" + hashlib.sha1(image_id.encode()).hexdigest()[:9]

    held = pd.read_csv(out / "test-labels.csv", dtype=str)
    expected = labels[labels["ImageId"].isin(test_ids)].assign(ImageId=lambda t: t["ImageId"].map(test_ids))
    assert held.values.tolist() == expected.values.tolist()
    train = pd.read_csv(out / "stage_2_train.csv", dtype=str)
    assert train.values.tolist() == labels[~labels["ImageId"].isin(test_ids)].values.tolist()
    sample = pd.read_csv(out / "stage_2_sample_submission.csv", dtype=str)
    assert sample["ImageId"].tolist() == sorted(test_ids.values()) and set(sample["EncodedPixels"]) == {"-1"}

    extra_files = {f.stem for f in (out / "extra").rglob("*") if f.is_file() and f.name != "labels.csv"}
    extra_labels = pd.read_csv(out / "extra" / "labels.csv", dtype=str)
    test_patients = {nih[i] for i in test_ids}
    assert (
        extra_files
        == set(extra_labels["ImageId"])
        == {i for i in patients if i.startswith("1.2.276.9.") and nih[i] not in test_patients}
    )
    assert not (out / "extra" / "mask").exists()  # the PNG masks are not images to train on


def test_bench_reals_recipe_pair_differs_in_seed_alone_on_one_split() -> None:
    """make bench-real blends real_cpu with its seed-1 twin, and the blend's search is cross-fitted on their shared
    folds: the twin must differ in nothing but the seed (a drifted key would blend two recipes), on one split."""
    first, second = (config.load(name) for name in bench_real.RECIPE)
    assert bench_real.RECIPE[0] == "real_cpu"
    diff = config.changed_keys(config.to_dict(first), config.to_dict(second))
    assert diff == ["name: 'real_cpu' -> 'real_cpu_s1'", f"seed: {first.seed} -> {second.seed}"]
    assert first.seed != second.seed and first.fold_seed == second.fold_seed == 42


def test_real_fp32_is_real_cpu_before_c25_so_the_ablation_runs_keep_their_meaning() -> None:
    """The ablation runs c0-c24 inherit real_fp32, the recipe they were measured against: real_cpu with fp32 steps,
    the gate's 14 epochs and the run's own split; it must not follow later changes of real_cpu's those keys."""
    now, before = config.to_dict(config.load("real_cpu")), config.to_dict(config.load("real_fp32"))
    assert config.changed_keys(now, before) == [
        "classifier.cpu_bf16: True -> False",
        "classifier.epochs: 20 -> 14",
        "name: 'real_cpu' -> 'real_fp32'",
        "segmentation.cpu_bf16: True -> False",
        "split_seed: 42 -> None",
    ]
    assert config.load("real_bf16").classifier.epochs == 14 and config.load("real_c25").classifier.epochs == 20


def _peak_world(seed: int) -> list[OOFPart]:
    """Three folds of 16x16 maps where the map's peak tells the label (a 4x4 blob of p 0.9 on the truth) and the
    classifier's probability is noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(3):
        label = rng.permutation(np.arange(20) % 2 == 0)
        probs = rng.integers(0, 90, size=(20, 16, 16)).astype(np.uint8)
        masks = np.zeros((20, 16, 16), dtype=bool)
        masks[label, 4:8, 6:10] = True
        probs[masks] = 230
        parts.append(OOFPart(probs, masks, rng.uniform(0.05, 0.95, 20)))
    return parts


def test_stacked_gate_features_read_each_map_and_its_classifier_probability_in_order() -> None:
    part = _peak_world(0)[0]
    table = stacked_gate.features(part)
    flat = part.probs.reshape(20, -1)
    assert table.shape == (20, 7)
    np.testing.assert_allclose(table[:, 0], np.log(part.gate / (1 - part.gate)))
    top = flat.max(axis=1) / 255.0  # 1/256 of 256 pixels is the highest one
    np.testing.assert_allclose(table[:, 1], np.log(top / (1 - top)))
    np.testing.assert_allclose(table[:, 3], np.log(top / (1 - top)))
    label = part.masks.reshape(20, -1).any(axis=1)
    assert (np.expm1(table[label, 5]).round() == 16).all() and (table[~label, 5] == 0).all()  # the blob's 16 pixels


def test_stacked_gate_learns_the_peak_that_tells_the_label_and_keeps_the_noise_out() -> None:
    """Fitted on two folds, the stacker ranks the third perfectly from the peak although the classifier is noise;
    searched on it, every positive is found whole and no negative predicted, in sample and one fold left out."""
    parts = _peak_world(1)
    tables = [stacked_gate.features(p)[:, [0, 3]] for p in parts]
    truth = [stacked_gate.labels(p) for p in parts]
    result = stacked_gate.stacked(parts, tables, truth, config.load("real_cpu").postprocess, 1.0)
    assert result["auc_held_out"] == [1.0, 1.0, 1.0]
    assert result["in_sample"] == pytest.approx(0.5) and result["crossfit"] == pytest.approx(0.5)
