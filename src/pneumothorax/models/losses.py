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


class ComboLoss(nn.Module):
    """``bce * BCE + dice * (1 - Dice) + focal * Focal`` with weights from the config."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        if cfg.bce < 0 or cfg.dice < 0 or cfg.focal < 0 or cfg.bce + cfg.dice + cfg.focal == 0:
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
        return total
