"""``make prepare``: DICOMs and label CSV -> metadata table and image/mask caches.

Caches are memory-mapped ``.npy`` arrays, one per split and size (``images_train_256.npy``
of shape (N, 256, 256) uint8, ``masks_train_256.npy`` 0/1), which the training loader
slices without decoding DICOM again. Work runs on all cores; each worker writes its rows
straight into the cache files (``pwrite`` into blocks reserved beforehand).

Up to date means: the same files (path order, size, modification time) with the same label
rows. ``prepare.json`` records a signature per image; a rerun decodes only images that are
new, replaced, relabelled or failed before (a failure is never remembered as a result), and
copies the rows of the others. New caches are written as ``*.npy.tmp`` with an append-only
progress log, so a killed run resumes where it stopped; they are renamed only when complete.
When only some images changed and the file list is the same, their rows are rewritten in
place. ``metadata.csv`` is rewritten only when its content changes. A lock on the folder
makes a second ``prepare`` wait.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd

from pneumothorax.data.prepared import RECORD_VERSION, PrepareError, read_record
from pneumothorax.io import atomic, dicom, images, manifest, npy_rows, paths, processes, progress_bars, resize, rle
from pneumothorax.io import layout as layout_mod

COLUMNS = [
    "image_id",
    "split",
    "index",
    "path",
    "has_pneumothorax",
    "n_annotations",
    "mask_area",
    "sex",
    "age",
    "view",
    "patient",
    "error",
]


KINDS = {
    "stage2": "stage 2 (today's download: stage_2_train.csv, stage_2_images/, stage-1 re-uploads for training)",
    "stage1": "stage 1 (train-rle.csv, dicom-images-train/, dicom-images-test/)",
    "custom": "custom (label CSV named by TRAIN_CSV)",
}


@dataclass
class Report:
    """What prepare found wrong or odd; written to ``prepare-report.json``."""

    layout: dict[str, str] = field(default_factory=dict)
    bad_train: list[dict[str, str]] = field(default_factory=list)
    bad_test: list[dict[str, str]] = field(default_factory=list)
    labels_without_image: list[str] = field(default_factory=list)
    unlabelled_images: list[str] = field(default_factory=list)
    duplicate_files: list[str] = field(default_factory=list)
    conflicting_duplicates: list[str] = field(default_factory=list)
    train_test_overlap: list[str] = field(default_factory=list)
    sop_mismatch: list[str] = field(default_factory=list)
    non_uid_sop: list[str] = field(default_factory=list)
    extra_without_label: list[str] = field(default_factory=list)
    extra_also_labelled: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    """What a layout holds: labels, the DICOMs of each split, the extra training images, and what did not fit."""

    labels: dict[str, list[str]]
    train: dict[str, Path]
    test: dict[str, Path]
    sample_ids: list[str] | None
    report: Report
    extra: dict[str, Path] = field(default_factory=dict)
    extra_labels: dict[str, list[str]] = field(default_factory=dict)

    def labels_of(self, split: str) -> dict[str, list[str]] | None:
        """The label rows of a split's images (None for the test split)."""
        return {"train": self.labels, "extra": self.extra_labels}.get(split)


def scan(found: layout_mod.Layout) -> Inputs:
    """Read the labels and find every DICOM of the layout; nothing is decoded yet.

    Raises:
        PrepareError: no labelled DICOM, an empty test folder, or a sample submission whose
            ids differ from the test DICOMs (each names examples).
    """
    labels = rle.read_labels(found.labels)
    if not labels:
        raise PrepareError(f"{found.labels}: the label CSV has no rows")
    train_all = layout_mod.index_dicoms(layout_mod.walk_dicoms(found.train_dirs, found.exclude))
    test = layout_mod.index_dicoms(layout_mod.walk_dicoms([found.test_dir])) if found.test_dir else None
    report = Report(layout=found.describe())
    report.duplicate_files = train_all.duplicates + (test.duplicates if test else [])
    report.conflicting_duplicates = train_all.conflicting + (test.conflicting if test else [])
    report.labels_without_image = sorted(set(labels) - set(train_all.files))
    report.unlabelled_images = sorted(set(train_all.files) - set(labels))
    train = {k: v for k, v in train_all.files.items() if k in labels}
    if not train:
        dirs = " ".join(str(d) for d in found.train_dirs)
        raise PrepareError(
            f"{dirs}: no DICOM file matches a row of {found.labels} ({len(train_all.files)} DICOMs found)"
        )
    test_files = test.files if test else {}
    if found.test_dir is not None and not test_files:
        raise PrepareError(
            f"{found.test_dir}: the test folder holds no DICOM file (TEST_DIR=none for a training-only run)"
        )
    report.train_test_overlap = sorted(set(train) & set(test_files))
    sample_ids = layout_mod.read_sample_ids(found.sample_submission) if found.sample_submission else None
    if sample_ids is not None:
        check_sample(sample_ids, list(test_files), found.sample_submission)
    inputs = Inputs(labels, train, test_files, sample_ids, report)
    if found.extra_dir is not None:
        _scan_extra(found, inputs)
    return inputs


def _scan_extra(found: layout_mod.Layout, inputs: Inputs) -> None:
    """The extra training images that have a label row (those also among the competition's labelled images
    are left out: an image is never both validated on and trained on in every fold)."""
    labels = rle.read_labels(found.extra_labels)
    files = layout_mod.index_dicoms(layout_mod.walk_images([found.extra_dir], skip=manifest.MASK_FOLDERS)).files
    inputs.report.extra_without_label = sorted(set(files) - set(labels))
    inputs.report.extra_also_labelled = sorted(set(files) & set(inputs.labels))
    keep = sorted(set(files) & set(labels) - set(inputs.labels))
    inputs.extra = {image_id: files[image_id] for image_id in keep}
    inputs.extra_labels = {image_id: labels[image_id] for image_id in keep}


def check_sample(sample_ids: Sequence[str], test_ids: Sequence[str], sample: Path | None) -> None:
    """The test DICOMs must be exactly the sample submission's images; names the first of each difference."""
    missing = sorted(set(sample_ids) - set(test_ids))
    extra = sorted(set(test_ids) - set(sample_ids))
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) of the sample submission have no test DICOM, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} test DICOM(s) are not in the sample submission, e.g. {extra[:3]}")
    if problems:
        raise PrepareError(
            f"{sample}: " + "; ".join(problems) + ". Kaggle scores exactly the sample's ids: fix the test folder, "
            "or set SAMPLE_SUBMISSION=none to submit whatever the test folder holds"
        )


def label_counts(path: Path) -> tuple[int, int]:
    """(rows, distinct images) of a label CSV, for the layout summary."""
    rows = rle.read_label_rows(path, validate=False)
    return len(rows), len({r.image_id for r in rows})


def describe_layout(found: layout_mod.Layout) -> str:
    """What ``prepare`` is about to read, in a few lines."""
    rows, image_count = label_counts(found.labels)
    lines = [
        f"layout: {KINDS[found.kind]}",
        f"  labels: {found.labels} ({rows:,} rows, {image_count:,} images)",
        "  training DICOMs: every labelled .dcm under "
        + ", ".join(str(d) for d in found.train_dirs)
        + (f" except {found.test_dir}" if found.test_dir else ""),
        f"  test DICOMs: {found.test_dir}" if found.test_dir else "  test DICOMs: none (training-only run)",
    ]
    if found.sample_submission:
        lines.append(f"  sample submission: {found.sample_submission}")
    return "\n".join(lines)


def read_patient_map(path: Path | None) -> dict[str, str]:
    """Kaggle image id -> NIH patient id (the part of ``00028864_007.png`` before ``_``)."""
    if path is None or not Path(path).exists():
        return {}
    table = pd.read_csv(path, dtype=str, skipinitialspace=True, encoding="utf-8-sig")
    table.columns = [c.strip() for c in table.columns]
    if not {"Kaggle_ID", "NIH_ID"} <= set(table.columns):
        raise PrepareError(f"{path}: expected columns Kaggle_ID,NIH_ID, got {list(table.columns)}")
    nih = table["NIH_ID"].str.strip().str.split("_").str[0]
    return dict(zip(table["Kaggle_ID"].str.strip(), nih, strict=True))


def signature(path: Path, rows: list[str] | None) -> str:
    """What makes an image's cache rows valid: its file's size and time, and its label rows."""
    stat = path.stat()
    rows_hash = hashlib.sha1("\n".join(rows).encode()).hexdigest()[:16] if rows is not None else "-"
    return f"{stat.st_size}:{stat.st_mtime_ns}:{rows_hash}"


# --- workers ---------------------------------------------------------------------------
class Target(NamedTuple):
    """One size's cache files of a split, being written: new (``.tmp``) or existing (``in_place``)."""

    size: int
    image: str
    image_offset: int
    mask: str | None
    mask_offset: int
    in_place: bool


class Source(NamedTuple):
    """One size's finished cache files from the previous run (rows to copy)."""

    image: str
    image_offset: int
    mask: str | None
    mask_offset: int


class ImageJob(NamedTuple):
    """One image: rows to decode and write, rows to copy from the previous caches, its previous metadata."""

    index: int
    path: str
    rows: list[str] | None  # label rows (train) or None (test)
    decode: tuple[Target, ...]
    copies: tuple[tuple[Target, Source, int, bool], ...]  # (target, source, old index, positive)
    previous: dict[str, Any] | None


_WRITER = npy_rows.RowWriter()


def _init_worker() -> None:
    processes.steady_malloc()
    _WRITER.close()


def _copy(target: Target, source: Source, index: int, old_index: int, positive: bool) -> None:
    nbytes = target.size * target.size
    row = _WRITER.read(source.image, source.image_offset, old_index, nbytes)
    _WRITER.write(target.image, target.image_offset, index, row)
    if positive and target.mask is not None and source.mask is not None:
        _WRITER.write(
            target.mask, target.mask_offset, index, _WRITER.read(source.mask, source.mask_offset, old_index, nbytes)
        )


def _process(job: ImageJob) -> dict[str, Any]:
    """Copy an image's unchanged rows, decode what changed; return its metadata."""
    for target, source, old_index, positive in job.copies:
        _copy(target, source, job.index, old_index, positive)
    if not job.decode:
        return {**(job.previous or {}), "index": job.index}
    try:
        pixels, meta = images.read(job.path)
        mask = rle.decode_union(job.rows, shape=pixels.shape) if job.rows else None  # None: test or negative
    except (dicom.DicomError, images.ImageError, rle.RLEError) as exc:
        return {"index": job.index, "error": str(exc)}
    # decode_union() returns a transposed view of a column-major buffer: scale that C-ordered
    # buffer and transpose the results with OpenCV (15x faster than NumPy's transposed copy,
    # 0.08 against 1.3 ms at 1024). Empty masks of new caches are not written: the cache is zero there.
    sizes = [target.size for target in job.decode]
    scaled = resize.pyramid(pixels, sizes)
    masks = resize.mask_pyramid(mask.T * np.uint8(255), sizes) if mask is not None else None
    for target in job.decode:
        _WRITER.write(target.image, target.image_offset, job.index, scaled[target.size])
        if target.mask is not None and masks is not None:
            _WRITER.write(target.mask, target.mask_offset, job.index, cv2.transpose(masks[target.size]))
        elif target.mask is not None and target.in_place:  # a relabelled negative: clear its old mask row
            _WRITER.write(target.mask, target.mask_offset, job.index, np.zeros((target.size, target.size), np.uint8))
    if job.rows is not None:
        meta["mask_area"] = int(np.count_nonzero(mask)) if mask is not None else 0
    meta["index"] = job.index
    return meta


def _process_chunk(jobs: list[ImageJob]) -> list[dict[str, Any]]:
    return [_process(job) for job in jobs]


# --- planning a split ------------------------------------------------------------------
@dataclass
class SplitPlan:
    """The work of one split: targets per size, the jobs, and what is kept as it was."""

    split: str
    ids: list[str]
    paths: list[str]
    sigs: list[str]
    targets: list[Target]
    jobs: list[ImageJob]
    kept: dict[int, dict[str, Any]]  # index -> metadata of images with no work (unchanged or logged)
    resumed: dict[int, dict[str, Any]]  # of those, the ones an interrupted run logged (the log keeps them)
    renames: list[tuple[Path, Path]]  # (tmp, final) when complete
    log_signature: str
    in_place_ids: list[str]  # images whose rows are rewritten in the existing caches


def _target(out_dir: Path, split: str, size: int, with_masks: bool, n: int, in_place: bool, fresh: bool) -> Target:
    """A size's cache files to write: the finished ones (in place), or ``.tmp`` ones (created unless resumed)."""
    kinds = ("images", "masks") if with_masks else ("images",)
    caches = [paths.ProcessedDir(out_dir).cache(kind, split, size) for kind in kinds]
    if not in_place:
        caches = [atomic.tmp_path(p) for p in caches]
    offsets = []
    for path in caches:
        if in_place or (path.exists() and not fresh):
            offsets.append(npy_rows.npy_data_offset(path))
        else:
            offsets.append(npy_rows.create_npy(path, np.uint8, (n, size, size)))
    mask = str(caches[1]) if with_masks else None
    return Target(size, str(caches[0]), offsets[0], mask, offsets[1] if with_masks else 0, in_place)


def _source(out_dir: Path, split: str, size: int, with_masks: bool) -> Source:
    processed = paths.ProcessedDir(out_dir)
    image = processed.cache("images", split, size)
    mask = processed.cache("masks", split, size) if with_masks else None
    return Source(
        str(image),
        npy_rows.npy_data_offset(image),
        str(mask) if mask else None,
        npy_rows.npy_data_offset(mask) if mask else 0,
    )


def _plan_split(
    split: str,
    dicoms: dict[str, Path],
    labels: dict[str, list[str]] | None,
    sizes: Sequence[int],
    out_dir: Path,
    old: dict[str, Any],
) -> SplitPlan:
    """Which rows to decode, copy or keep, against the previous run's record of this split."""
    ids = list(dicoms)
    sigs = [signature(dicoms[i], labels.get(i, []) if labels is not None else None) for i in ids]
    same_list = ids == old.get("ids", [])
    log_signature = hashlib.sha1(json.dumps([ids, sigs, sorted(sizes), same_list]).encode()).hexdigest()
    finished, resumable = _finished(split, labels is not None, sizes, out_dir, old, same_list)
    logged = _read_progress(paths.ProcessedDir(out_dir).progress(split), log_signature) if resumable else {}
    targets, sources, renames = _caches(split, len(ids), labels is not None, finished, out_dir, same_list, not logged)
    old_index = {image_id: k for k, image_id in enumerate(old.get("ids", []))}
    jobs, kept, in_place_ids = [], {}, []
    for i, image_id in enumerate(ids):
        k = old_index.get(image_id)
        unchanged = k is not None and old["sigs"][k] is not None and old["sigs"][k] == sigs[i]
        previous = old["metas"][k] if unchanged else None
        pairs = list(zip(targets, sources, strict=True))
        decode = tuple(t for t, src in pairs if not unchanged or (not t.in_place and src is None))
        positive = bool(previous and previous.get("mask_area", 0))
        copies = tuple((t, src, k, positive) for t, src in pairs if unchanged and src is not None)
        if i in logged:
            kept[i] = logged[i]
        elif not decode and not copies:
            kept[i] = {**(previous or {}), "index": i}
        else:
            rows = labels.get(image_id, []) if labels is not None else None
            jobs.append(ImageJob(i, str(dicoms[image_id]), rows, decode, copies, previous))
            if any(t.in_place for t in decode):
                in_place_ids.append(image_id)
    _reserve(targets, jobs)
    files_ = [str(dicoms[i]) for i in ids]
    return SplitPlan(split, ids, files_, sigs, targets, jobs, kept, logged, renames, log_signature, in_place_ids)


def _finished(
    split: str, with_masks: bool, sizes: Sequence[int], out_dir: Path, old: dict[str, Any], same_list: bool
) -> tuple[dict[int, bool], bool]:
    """Per size, whether its finished caches exist; and whether a previous run's progress can resume
    (only if every partial cache it wrote into is still there)."""
    kinds, processed = ("images", "masks") if with_masks else ("images",), paths.ProcessedDir(out_dir)
    finished = {
        size: size in old.get("sizes", []) and all(processed.cache(k, split, size).exists() for k in kinds)
        for size in sizes
    }
    partial = [
        atomic.tmp_path(processed.cache(k, split, s)) for s in sizes if not (finished[s] and same_list) for k in kinds
    ]
    return finished, all(p.exists() for p in partial)


def _caches(
    split: str, n: int, with_masks: bool, finished: dict[int, bool], out_dir: Path, same_list: bool, fresh: bool
) -> tuple[list[Target], list[Source | None], list[tuple[Path, Path]]]:
    """Per size: the cache files to write (in place when the file list is unchanged, else ``.tmp``,
    empty when ``fresh``), the finished caches to copy unchanged rows from, and the renames when done."""
    targets, sources, renames = [], [], []
    for size, done in finished.items():
        in_place = done and same_list
        targets.append(_target(out_dir, split, size, with_masks, n, in_place, fresh))
        sources.append(_source(out_dir, split, size, with_masks) if done and not in_place else None)
        if not in_place:
            renames += [(Path(p), Path(p[: -len(".tmp")])) for p in (targets[-1].image, targets[-1].mask) if p]
    return targets, sources, renames


def _reserve(targets: list[Target], jobs: list[ImageJob]) -> None:
    """Reserve the blocks the workers will write in new caches (negative masks stay holes: zeros, no disk)."""
    for target in targets:
        if target.in_place:
            continue
        row = target.size * target.size
        writes = [
            t
            for t in jobs
            if any(x.size == target.size for x in t.decode) or any(c[0].size == target.size for c in t.copies)
        ]
        npy_rows.reserve(target.image, [(target.image_offset + t.index * row, row) for t in writes])
        if target.mask is not None:
            positive = [t for t in writes if t.rows or any(c[3] for c in t.copies if c[0].size == target.size)]
            npy_rows.reserve(target.mask, [(target.mask_offset + t.index * row, row) for t in positive])


def _read_progress(path: Path, signature_: str) -> dict[int, dict[str, Any]]:
    """Metadata of the images a previous run finished, from its progress log (if it planned the same work).

    The log is a signature line, then one JSON line per finished image; a line cut short by a
    kill ends the reading (that image is done again), and a failure is not a result: a file
    that failed is read again.
    """
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("signature") != signature_:
            return {}
    except json.JSONDecodeError:
        return {}
    metas: dict[int, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            meta = json.loads(line)
        except json.JSONDecodeError:
            break
        if "error" not in meta:
            metas[int(meta["index"])] = meta
    return metas


def _open_progress(path: Path, signature_: str, metas: dict[int, dict[str, Any]]) -> Any:
    """Start the progress log afresh with what is already done (atomically), and open it to append."""
    lines = [json.dumps({"signature": signature_})] + [json.dumps(meta) for meta in metas.values()]
    atomic.write_text(path, "\n".join(lines) + "\n")
    return open(path, "a")  # noqa: SIM115 - closed by the caller's finally


# --- running a split -------------------------------------------------------------------
def _results(jobs: list[ImageJob], workers: int) -> Any:
    """Yield the metadata of every job as it finishes, on ``workers`` processes.

    A worker that dies (the out-of-memory killer, a segfault in a decoder) fails the step at
    once, instead of leaving it waiting for a result that never comes.
    """
    processes.single_threaded_opencv()  # before forking: see its docstring
    if workers <= 1:
        _init_worker()
        yield from map(_process, jobs)
        return
    chunk = _chunksize(len(jobs), workers)
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    rle.decode("1 1", shape=(1, 2))  # load the numba kernels once, before the workers fork
    pool = futures.ProcessPoolExecutor(workers, processes.mp_context(), initializer=_init_worker)
    try:
        pending = [pool.submit(_process_chunk, c) for c in chunks]
        for done in futures.as_completed(pending):
            yield from done.result()
    except BrokenProcessPool:
        raise PrepareError(
            "a prepare worker died (killed by a signal: the out-of-memory killer?). The images finished so far "
            "are kept: rerun to resume, with fewer workers (--workers 1) if memory is short"
        ) from None
    finally:  # a failure or Ctrl-C stops the workers now; what was logged is kept for the next run
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _chunksize(n_tasks: int, workers: int) -> int:
    """Tasks per message to a worker: fewer messages on big jobs, yet about 16 chunks per worker."""
    return max(1, min(32, n_tasks // (16 * max(workers, 1))))


def _run_split(plan: SplitPlan, out_dir: Path, workers: int, progress: bool) -> dict[int, dict[str, Any]]:
    """Do a split's jobs (logging each finished image); return index -> metadata for every image."""
    metas = dict(plan.kept)
    if not plan.jobs:
        return metas
    bar = progress_bars.counter(len(plan.ids), f"prepare {plan.split}", progress, "img", initial=len(metas))
    log = _open_progress(paths.ProcessedDir(out_dir).progress(plan.split), plan.log_signature, plan.resumed)
    try:
        for count, result in enumerate(_results(plan.jobs, min(workers, len(plan.jobs))), start=1):
            metas[result["index"]] = result
            log.write(json.dumps(result) + "\n")
            bar.update()
            if count % 64 == 0:
                log.flush()
    finally:
        bar.close()
        log.close()
        _WRITER.close()
    return metas


def _finish_split(plan: SplitPlan, out_dir: Path) -> None:
    for tmp, final in plan.renames:
        os.replace(tmp, final)
    (paths.ProcessedDir(out_dir).progress(plan.split)).unlink(missing_ok=True)


# --- the step --------------------------------------------------------------------------
def prepare(
    found: layout_mod.Layout,
    out_dir: str | Path,
    sizes: Sequence[int] = (256, 512, 1024),
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Build or update ``metadata.csv`` and the caches under ``out_dir``; return the metadata table.

    Sizes already cached for other experiments are kept up to date too (``prepare.json``
    records their union). Holds a lock on ``out_dir``: a second run waits.

    Raises:
        PrepareError: listing every unreadable training file (unless ``skip_bad``), or
            naming what is missing or inconsistent in the inputs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic.locked(paths.ProcessedDir(out_dir).lock, f"the processed folder {out_dir}"):
        return _prepare(found, out_dir, sizes, workers or os.cpu_count() or 1, skip_bad, progress)


def _prepare(
    found: layout_mod.Layout, out_dir: Path, sizes: Sequence[int], workers: int, skip_bad: bool, progress: bool
) -> pd.DataFrame:
    inputs = scan(found)
    record = read_record(out_dir)
    all_sizes = sorted({int(s) for s in sizes} | set(record.get("sizes", [])))
    splits = {"train": inputs.train, "extra": inputs.extra, "test": inputs.test}
    plans = {
        split: _plan_split(split, files, inputs.labels_of(split), all_sizes, out_dir, record["splits"].get(split, {}))
        for split, files in splits.items()
        if files or split != "extra"  # no extra folder, no extra caches
    }
    _forget(record, plans, out_dir)  # rows about to be rewritten in place are not valid until done
    metas = {split: _run_split(plans[split], out_dir, workers, progress) for split in plans if split != "test"}
    report = inputs.report
    report.bad_train = [bad for split in metas for bad in _bad(plans[split], metas[split])]
    if report.bad_train and not skip_bad:
        _write_report(out_dir, report)
        lines = "\n".join(f"  {b['path']}: {b['error']}" for b in report.bad_train)
        raise PrepareError(
            f"{len(report.bad_train)} unreadable training file(s) (replace them and rerun, or rerun with "
            f"--skip-bad / SKIP_BAD=1 to leave them out):\n{lines}"
        )
    metas["test"] = _run_split(plans["test"], out_dir, workers, progress)
    report.bad_test = _bad(plans["test"], metas["test"])
    for plan in plans.values():
        _finish_split(plan, out_dir)
    table = _table(plans, metas, inputs, read_patient_map(found.patient_map), report)
    _write_report(out_dir, report)
    atomic.write_text_if_changed(paths.ProcessedDir(out_dir).metadata, table.to_csv(index=False))
    record = {"version": RECORD_VERSION, "sizes": all_sizes, "layout": found.describe(), "splits": {}}
    for split, plan in plans.items():
        ordered = [metas[split][i] for i in range(len(plan.ids))]
        sigs = [None if "error" in m else sig for m, sig in zip(ordered, plan.sigs, strict=True)]
        record["splits"][split] = {"ids": plan.ids, "sigs": sigs, "metas": ordered, "sizes": all_sizes}
    atomic.write_json(paths.ProcessedDir(out_dir).record, record)
    manifest.update(found, out_dir)  # as Make's, where prepare runs alone: what training runs record they learnt from
    return table


def _forget(record: dict[str, Any], plans: dict[str, SplitPlan], out_dir: Path) -> None:
    """Clear the recorded signatures of images whose rows will be rewritten in place (a kill then redoes them)."""
    changed = False
    for split, plan in plans.items():
        old = record["splits"].get(split)
        if old and plan.in_place_ids:
            index = {image_id: k for k, image_id in enumerate(old["ids"])}
            for image_id in plan.in_place_ids:
                old["sigs"][index[image_id]] = None
            changed = True
    if changed:
        atomic.write_json(paths.ProcessedDir(out_dir).record, record)


def _bad(plan: SplitPlan, metas: dict[int, dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {"image_id": plan.ids[i], "path": plan.paths[i], "error": metas[i]["error"]}
        for i in range(len(plan.ids))
        if "error" in metas[i]
    ]


def _table(
    plans: dict[str, SplitPlan],
    metas: dict[str, dict[int, dict[str, Any]]],
    inputs: Inputs,
    patients: dict[str, str],
    report: Report,
) -> pd.DataFrame:
    records = []
    for split, plan in plans.items():
        for i, image_id in enumerate(plan.ids):
            meta = metas[split][i]
            sop = meta.get("sop_instance_uid")
            if sop and sop != image_id:
                report.sop_mismatch.append(image_id)
            if sop and meta.get("sop_is_uid") is False:
                report.non_uid_sop.append(image_id)
            labels = inputs.labels_of(split)
            rows = labels.get(image_id, []) if labels is not None else []
            records.append(
                {
                    "image_id": image_id,
                    "split": split,
                    "index": i,
                    "path": plan.paths[i],
                    "has_pneumothorax": int(bool(rows)) if labels is not None else -1,
                    "n_annotations": len(rows),
                    "mask_area": meta.get("mask_area", 0) if labels is not None else -1,
                    "sex": meta.get("sex"),
                    "age": meta.get("age"),
                    "view": meta.get("view"),
                    "patient": patients.get(image_id, image_id),
                    "error": meta.get("error", ""),
                }
            )
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def _write_report(out_dir: Path, report: Report) -> None:
    atomic.write_json(paths.ProcessedDir(out_dir).report, report.__dict__)
