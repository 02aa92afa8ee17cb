"""Segmentation losses: values a wrong sign, a lost pixel or a weighting bug would change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumothorax.io import config
from pneumothorax.models import losses

pytestmark = pytest.mark.unit


def _masks(seed: int, n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random truth and prediction masks (B, 1, size, size), with one empty truth and one exact prediction."""
    rng = np.random.default_rng(seed)
    truth = torch.from_numpy(rng.random((n, 1, size, size)) < 0.3).float()
    pred = torch.from_numpy(rng.random((n, 1, size, size)) < 0.3).float()
    truth[0] = 0  # an image with no pneumothorax
    pred[1] = truth[1]  # a perfect prediction
    return truth, pred


def _iou(truth: torch.Tensor, pred: torch.Tensor) -> float:
    union = float(((truth + pred) > 0).sum())
    return float((truth * pred).sum()) / union if union else 1.0


@pytest.mark.parametrize("margin", [1.0, 3.0])
def test_lovasz_hinge_of_sure_logits_is_the_per_image_jaccard_loss(margin):
    """Logits of +-m (m >= 1) give hinge errors max(0, 1 - m) = 0 (right) or 1 + m (wrong); the Lovasz extension is
    positively homogeneous and equals the Jaccard loss on a set's indicator, so the loss is (1 + m)(1 - IoU) per
    image, averaged."""
    truth, pred = _masks(0)
    logits = margin * (2.0 * pred - 1.0)
    expected = np.mean([(1 + margin) * (1 - _iou(t, p)) for t, p in zip(truth, pred, strict=True)])
    assert losses.lovasz_hinge(logits, truth).item() == pytest.approx(expected, rel=1e-5)
    assert losses.lovasz_hinge(logits[1:2], truth[1:2]).item() == 0.0  # right everywhere, with the margin
    empty = losses.lovasz_hinge(-torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert empty.item() == 0.0  # an empty truth predicted empty: nothing to lose


def test_lovasz_hinge_gradient_moves_wrong_pixels_towards_their_class():
    truth, pred = _masks(1)
    logits = (2.0 * pred - 1.0).requires_grad_()
    losses.lovasz_hinge(logits, truth).backward()
    wrong, grad = pred != truth, logits.grad
    # descending the gradient never lowers a missed pixel's logit nor raises a false one's; it moves most of them
    # (a subgradient: ties in the errors leave some at 0)
    assert (grad[wrong & (truth == 1)] <= 0).all() and (grad[wrong & (truth == 0)] >= 0).all()
    assert (grad[wrong] != 0).float().mean() > 0.5 and (grad[~wrong] == 0).all()  # right with the margin: none


def test_image_label_loss_reads_the_mean_of_each_maps_top_logits():
    """Two 4 x 4 maps (16 pixels), top 1/8 = the 2 highest logits: a positive whose top two are 3 and 1 (mean 2)
    and an empty one whose top two are -1 and -3 (mean -2); both right, each costs log(1 + e^-2)."""
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, 0, :2] = torch.tensor([3.0, 1.0])
    logits[1, 0, 3, 2:] = torch.tensor([-1.0, -3.0])
    truth = torch.zeros_like(logits)
    truth[0, 0, 2, 2] = 1.0  # the label is the whole mask's: its pixels need not be the peak's
    right = np.log1p(np.exp(-2.0))
    assert losses.image_label_loss(logits, truth, 1 / 8).item() == pytest.approx(right, rel=1e-6)
    swapped = losses.image_label_loss(logits, truth.flip(0), 1 / 8).item()
    assert swapped == pytest.approx(np.log1p(np.exp(2.0)), rel=1e-6)  # both wrong by the same margin
    # top 1/16 is the single highest pixel: 3 and -1
    expected = (np.log1p(np.exp(-3.0)) + np.log1p(np.exp(-1.0))) / 2
    assert losses.image_label_loss(logits, truth, 1 / 16).item() == pytest.approx(expected, rel=1e-6)
    assert losses.image_label_loss(logits, truth, 1e-6).item() == pytest.approx(expected, rel=1e-6)  # >= 1 pixel


def test_image_label_loss_gradient_reaches_only_the_top_pixels():
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, 0, :2] = torch.tensor([3.0, 1.0])
    logits[1, 0, 3, 2:] = torch.tensor([-1.0, -3.0])
    logits.requires_grad_()
    truth = torch.zeros_like(logits)
    truth[0, 0, 2, 2] = 1.0
    losses.image_label_loss(logits, truth, 1 / 8).backward()
    grad = logits.grad
    assert (grad[0, 0, 0, :2] < 0).all() and (grad[1, 0, 3, 2:] > 0).all()  # up on the positive, down on the empty
    assert int((grad != 0).sum()) == 4  # the two top pixels of each map, nothing else


def test_combo_loss_is_the_weighted_sum_of_its_terms():
    truth, _ = _masks(2)
    logits = torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    terms = {
        "bce": F.binary_cross_entropy_with_logits(logits, truth).item(),
        "dice": losses.soft_dice_loss(logits, truth).item(),
        "focal": losses.focal_loss(logits, truth, 2.0).item(),
        "lovasz": losses.lovasz_hinge(logits, truth).item(),
        "image": losses.image_label_loss(logits, truth, 1 / 64).item(),
    }
    cfg = config.LossConfig(bce=0.5, dice=2.0, focal=3.0, focal_gamma=2.0, lovasz=0.25, image=0.75, image_top=1 / 64)
    expected = 0.5 * terms["bce"] + 2.0 * terms["dice"] + 3.0 * terms["focal"] + 0.25 * terms["lovasz"]
    expected += 0.75 * terms["image"]
    assert losses.ComboLoss(cfg)(logits, truth).item() == pytest.approx(expected, rel=1e-5)
    only = losses.ComboLoss(config.LossConfig(bce=0.0, dice=0.0, focal=0.0, focal_gamma=2.0, lovasz=1.0))
    assert only(logits, truth).item() == pytest.approx(terms["lovasz"], rel=1e-6)
    image = config.LossConfig(bce=0.0, dice=0.0, focal=0.0, focal_gamma=2.0, lovasz=0.0, image=1.0, image_top=1 / 64)
    assert losses.ComboLoss(image)(logits, truth).item() == pytest.approx(terms["image"], rel=1e-6)
    with pytest.raises(ValueError, match="not all zero"):
        losses.ComboLoss(config.LossConfig(bce=0.0, dice=0.0, focal=0.0, focal_gamma=2.0, lovasz=0.0))
    with pytest.raises(ValueError, match=">= 0"):
        losses.ComboLoss(config.LossConfig(bce=1.0, dice=0.0, focal=0.0, focal_gamma=2.0, lovasz=-1.0))
