"""RLE: the competition format, proven on the real label file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pneumothorax.io import rle

from .conftest import REAL_CSV


def test_four_by_four_vectors():
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 0] = mask[2, 0] = mask[0, 1] = 1
    assert rle.encode(mask) == "1 2 1 1"
    assert (rle.decode("1 2 1 1", (4, 4)) == mask).all()
    wrap = np.zeros((4, 4), np.uint8)
    wrap[3, 0] = wrap[0, 1] = 1  # a run wraps from one column into the next
    assert rle.encode(wrap) == "3 2"
    assert (rle.decode("3 2", (4, 4)) == wrap).all()


def test_absolute_format():
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 0] = mask[2, 0] = mask[0, 1] = 1
    assert rle.encode(mask, relative=False) == "1 2 4 1"
    assert (rle.decode("1 2 4 1", (4, 4), relative=False) == mask).all()


def test_run_reaching_last_pixel_is_kept():
    mask = np.zeros((1024, 1024), np.uint8)
    mask[-3:, -1] = 1  # the last three pixels of the last column
    assert rle.encode(mask) == f"{1024 * 1024 - 3} 3"
    full = np.ones((8, 8), np.uint8)
    assert rle.encode(full) == "0 64"
    assert rle.decode(rle.encode(mask)).sum() == 3


@pytest.mark.parametrize("order", ["C", "F"])
def test_random_round_trip(order):
    rng = np.random.default_rng(0)
    for shape in [(1024, 1024), (37, 53), (8, 8)]:
        mask = np.asarray(rng.random(shape) < 0.3, dtype=np.uint8, order=order)
        text = rle.encode(mask)
        assert (rle.decode(text, shape) == mask).all()
        assert rle.encode(mask.astype(bool)) == text


def test_empty():
    assert rle.encode(np.zeros((16, 16), np.uint8)) == "-1"
    assert rle.decode("-1", (16, 16)).sum() == 0
    assert rle.decode(" -1 ", (16, 16)).sum() == 0


def test_real_file_counts(real_rows, real_labels):
    assert len(real_rows) == 12_954
    assert len(real_labels) == 12_047
    assert sum(1 for rows in real_labels.values() if rows) == 2_669
    assert sum(1 for rows in real_labels.values() if len(rows) > 1) == 624
    assert sum(1 for r in real_rows if r.rle != "-1") == 3_576


def test_real_facts(real_labels):
    base = "1.2.276.0.7230010.3.1.4.8323329."
    rows = real_labels[base + "10005.1517875220.958951"]
    assert len(rows) == 1 and rows[0].startswith("209126 1 1019 6 1015 10 1012 13")
    mask = rle.decode(rows[0])
    assert mask.sum() == 6_682
    r, c = np.nonzero(mask.T)  # first pixel in column-major order
    assert (c[0], r[0]) == (230, 204)
    four = real_labels[base + "14508.1517875252.443873"]
    assert sorted(int(rle.decode(x).sum()) for x in four) == [2_105, 4_119, 6_217, 10_250]
    assert rle.decode_union(four).sum() == 22_690
    assert rle.decode_union(real_labels[base + "13666.1517875247.117800"]).sum() == 30_859
    box = rle.decode_union(real_labels[base + "301.1517875162.280319"])
    rows_, cols = np.nonzero(box)
    assert box.sum() == 10_133
    assert (rows_.min(), rows_.max(), cols.min(), cols.max()) == (94, 403, 193, 469)


def test_every_real_row_round_trips(real_rows):
    counts = []
    for row in real_rows:
        if row.rle == "-1":
            continue
        mask = rle.decode(row.rle)
        assert rle.encode(mask) == row.rle, row.image_id
        counts.append(int(mask.sum()))
    assert len(counts) == 3_576
    assert min(counts) == 55 and max(counts) == 161_421 and int(np.median(counts)) == 6_504


def test_header_and_value_spaces(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ImageId, EncodedPixels\n a , 1 2 1 1 \nb, -1\na,3 1\n")
    labels = rle.read_labels(path, shape=(4, 4))
    assert labels == {"a": ["1 2 1 1", "3 1"], "b": []}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1 2 3", "odd number of tokens"),
        ("1 -2", "negative number"),
        ("1 2.5", "non-integer token"),
        ("1 x", "non-integer token"),
        ("10 7", "past the 4x4 image"),
        ("1 0", "zero-length run"),
    ],
)
def test_malformed_rows_name_line_and_image(tmp_path, value, reason):
    path = tmp_path / "bad.csv"
    path.write_text(f"ImageId,EncodedPixels\nok,-1\nimg7,{value}\n")
    with pytest.raises(rle.RLEError) as info:
        rle.read_labels(path, shape=(4, 4))
    message = str(info.value)
    assert "line 3" in message and "img7" in message and reason in message and str(path) in message


def test_bad_header_and_empty_value(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("Id,Pixels\na,-1\n")
    with pytest.raises(rle.RLEError, match="lacks 'ImageId'"):
        rle.read_labels(path)
    path.write_text("ImageId,EncodedPixels\na,\n")
    with pytest.raises(rle.RLEError, match="line 2 .*empty EncodedPixels"):
        rle.read_labels(path)


def test_gzip_reader_matches_plain(tmp_path):
    plain = tmp_path / "train-rle.csv"
    with gzip.open(REAL_CSV, "rt") as fh:
        head = "".join(fh.readline() for _ in range(50))
    plain.write_text(head)
    rows = rle.read_label_rows(plain)
    assert len(rows) == 49
    assert rows == rle.read_label_rows(REAL_CSV)[:49]
