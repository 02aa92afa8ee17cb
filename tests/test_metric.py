"""The competition metric's conventions, and the gate's metrics against scikit-learn's."""

import numpy as np
import pytest
from sklearn import metrics as skm

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


def test_gate_metrics_by_hand():
    labels = np.array([1, 1, 0, 0, 0])
    probs = np.array([0.9, 0.4, 0.6, 0.1, 0.2])
    m = metric.gate_metrics(labels, probs, 0.5)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["accuracy"] == 0.6
    assert m["auc"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    probs = np.round(rng.random(200) * 0.6 + 0.3 * labels, 1)  # coarse: many ties, across the classes
    pred = (probs >= 0.5).astype(int)
    m = metric.gate_metrics(labels, probs, 0.5)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-12)
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, pred), abs=1e-12)
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred, zero_division=0), abs=1e-12)
    assert m["recall"] == pytest.approx(skm.recall_score(labels, pred, zero_division=0), abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-12)
    all_negative = metric.gate_metrics(labels, np.zeros(200), 0.5)
    assert all_negative["mcc"] == skm.matthews_corrcoef(labels, np.zeros(200, int)) == 0.0
    assert np.isnan(metric.gate_metrics(np.zeros(5, int), probs[:5], 0.5)["auc"])
