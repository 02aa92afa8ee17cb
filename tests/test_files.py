"""Atomic writes, page-aligned .npy caches written row by row, reserved blocks."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from pneumothorax.io import atomic, npy_rows, processes, tables


def test_create_npy_is_page_aligned_and_loads(tmp_path):
    path = tmp_path / "a.npy"
    offset = npy_rows.create_npy(path, np.uint8, (3, 16, 16))
    assert offset == 4096 and npy_rows.npy_data_offset(path) == 4096
    array = np.load(path, mmap_mode="r")
    assert array.shape == (3, 16, 16) and array.dtype == np.uint8 and not array.any()
    assert os.stat(path).st_blocks * 512 <= 8192  # sparse: the data takes no disk until written
    assert npy_rows.create_npy(tmp_path / "f.npy", np.float32, (2, 5)) == 4096
    assert np.load(tmp_path / "f.npy").dtype == np.float32


def test_row_writer_writes_rows_in_place(tmp_path):
    path = tmp_path / "rows.npy"
    offset = npy_rows.create_npy(path, np.uint8, (4, 8, 8))
    npy_rows.reserve(path, [(offset + 8 * 64, 64), (offset + 64, 64), (offset, 64)])  # merged into two ranges
    rows = np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8)
    writer = npy_rows.RowWriter()
    writer.write(str(path), offset, 2, rows[2])
    writer.write(str(path), offset, 0, rows[0].T.T)
    writer.write(str(path), offset, 3, np.asfortranarray(rows[3]))  # made C-contiguous before writing
    writer.close()
    out = np.load(path)
    assert (out[0] == rows[0]).all() and not out[1].any() and (out[2] == rows[2]).all() and (out[3] == rows[3]).all()


def test_reserve_allocates_blocks(tmp_path):
    path = tmp_path / "big.npy"
    offset = npy_rows.create_npy(path, np.uint8, (8, 256, 256))
    before = os.stat(path).st_blocks
    npy_rows.reserve(path, [(offset + i * 65536, 65536) for i in (1, 2, 5)])
    after = os.stat(path).st_blocks
    if after == before:
        pytest.skip("this filesystem does not allocate with fallocate")
    assert (after - before) * 512 >= 3 * 65536
    assert not np.load(path).any()  # reserved blocks read as zeros


def test_steady_malloc_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert processes.steady_malloc() is True


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and not atomic.tmp_path(target).exists()


def test_a_full_disk_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    import torch

    from pneumothorax.train import checkpoints

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 470")

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "fold0" / "state.pt"
    with pytest.raises(atomic.WriteError, match=r"fold0/state.pt: could not write .* GiB free on the disk holding"):
        checkpoints.save_checkpoint(target, {"x": 1})
    assert not target.exists() and not atomic.tmp_path(target).exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(atomic.WriteError, match="a-file/out.json: could not write"):  # a file where a folder should be
        atomic.write_json(tmp_path / "a-file" / "out.json", {})


def test_fold_out_of_range_fails_before_training():
    from pneumothorax.io import config
    from pneumothorax.train import trainer

    with pytest.raises(config.ConfigError, match="fold 9 is not a fold of tiny, whose data.n_folds is 2"):
        trainer.check_fold(config.load("tiny"), 9)


def test_markdown_table_keeps_integers_blanks_missing_and_rounds_floats():
    frame = pd.DataFrame({"fold": [0, 1], "dice": [0.123456, float("nan")], "note": ["a", None]})
    text = tables.markdown_table(frame.columns, frame.itertuples(index=False), digits=4)
    assert text.splitlines() == ["| fold | dice | note |", "| --- | --- | --- |", "| 0 | 0.1235 | a |", "| 1 |  |  |"]
