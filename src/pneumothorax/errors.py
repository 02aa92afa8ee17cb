"""Errors that the torch-side modules raise and every script reports in one line (:data:`pneumothorax.cli.ERRORS`).

They live here, not beside the code that raises them, so that ``cli`` imports no torch: scripts that
never build a model (submit, score, leaderboard) start in about a second instead of four.
"""

from __future__ import annotations


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be obtained or do not fit the model."""


class DeviceError(RuntimeError):
    """A GPU is there but torch cannot use it; the message says why and what to do."""
