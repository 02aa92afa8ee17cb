"""Segmentation losses: pure functions, and the configured combination as a module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumothorax.io.config import LossConfig


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch (as in the 2ST-UNet BCE + Dice recipe)."""
    probs = torch.sigmoid(logits.float())
    targets = targets.float()
    inter = (probs * targets).sum()
    return 1.0 - (2.0 * inter + eps) / (probs.sum() + targets.sum() + eps)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on logits (Lin et al.), mean over pixels."""
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.exp(-bce)
    return ((1.0 - p_t) ** gamma * bce).mean()


def _jaccard_steps(truth_sorted: torch.Tensor) -> torch.Tensor:
    """The Jaccard loss's increments as the pixels, in this order, are counted as errors one by one: the
    gradient of its Lovasz extension (Berman et al. 2018, Alg. 1)."""
    positives = truth_sorted.sum()
    intersection = positives - truth_sorted.cumsum(0)
    union = positives + (1.0 - truth_sorted).cumsum(0)
    loss = 1.0 - intersection / union
    return torch.cat([loss[:1], loss[1:] - loss[:-1]])


def lovasz_hinge(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge (Berman et al.), per image then averaged: a convex surrogate of 1 - IoU that, like the
    competition's per-image Dice, weighs every image alike. Logits of +-1 on a 0/1 mask give 2 (1 - IoU)."""
    logits, targets = logits.float().flatten(1), targets.float().flatten(1)
    losses = []
    for image_logits, truth in zip(logits, targets, strict=True):
        errors = 1.0 - image_logits * (2.0 * truth - 1.0)
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _jaccard_steps(truth[order])))
    return torch.stack(losses).mean()


def image_label_loss(logits: torch.Tensor, targets: torch.Tensor, top: float) -> torch.Tensor:
    """BCE of each image's label (any mask pixel) against the mean of its ``top`` fraction of highest logits:
    the image-level decision the search reads from the map (``postprocess.gate_top``) trained directly, so a
    positive's peak rises and a negative's whole map falls. Mean over the images."""
    flat_logits, flat_targets = logits.float().flatten(1), targets.float().flatten(1)
    k = max(1, round(top * flat_logits.shape[1]))
    peak = flat_logits.topk(k, dim=1).values.mean(dim=1)
    labels = (flat_targets.amax(dim=1) > 0.5).float()
    return F.binary_cross_entropy_with_logits(peak, labels)


class ComboLoss(nn.Module):
    """``bce * BCE + dice * (1 - Dice) + focal * Focal + lovasz * Lovasz hinge + image * image-label BCE`` with
    weights from the config."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        weights = (cfg.bce, cfg.dice, cfg.focal, cfg.lovasz, cfg.image)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError(f"loss weights must be >= 0 and not all zero, got {cfg}")
        self.cfg = cfg

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the configured terms."""
        cfg = self.cfg
        total = logits.new_zeros((), dtype=torch.float32)
        if cfg.bce:
            total = total + cfg.bce * bce_loss(logits, targets)
        if cfg.dice:
            total = total + cfg.dice * soft_dice_loss(logits, targets)
        if cfg.focal:
            total = total + cfg.focal * focal_loss(logits, targets, cfg.focal_gamma)
        if cfg.lovasz:
            total = total + cfg.lovasz * lovasz_hinge(logits, targets)
        if cfg.image:
            total = total + cfg.image * image_label_loss(logits, targets, cfg.image_top)
        return total
