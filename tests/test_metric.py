"""The competition metric's conventions."""

import numpy as np

from pneumothorax.io import metric


def test_conventions():
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1, 1] = True
    assert metric.dice_per_image(empty, empty)[0] == 1.0  # both empty
    assert metric.dice_per_image(some, empty)[0] == 0.0  # false positive on an empty image
    assert metric.dice_per_image(empty, some)[0] == 0.0  # missed


def test_value_and_batch():
    truth = np.zeros((2, 4, 4), bool)
    pred = np.zeros((2, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 pixels
    pred[0, :2, :1] = True  # 2 pixels, both inside
    # image 0: 2*2/(2+4) = 2/3; image 1: both empty = 1
    assert np.allclose(metric.dice_per_image(pred, truth), [2 / 3, 1.0])
    assert np.isclose(metric.mean_dice(pred, truth), (2 / 3 + 1) / 2)
    assert np.allclose(metric.iou_per_image(pred, truth), [0.5, 1.0])
    table = metric.dice_table(["a", "b"], pred, truth)
    assert table["true_area"].tolist() == [4, 0] and table["pred_area"].tolist() == [2, 0]
