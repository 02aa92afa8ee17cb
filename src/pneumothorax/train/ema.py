"""An exponential moving average of a model's weights, updated after every optimiser step without a host sync.

``torch.optim.swa_utils.AveragedModel`` checks ``n_averaged == 0`` on a device tensor at each update,
which makes a CUDA process wait for the GPU at every step. Here the first update is a Python flag, and
the floating-point weights and buffers move with one ``_foreach_lerp_``: the same numbers as
AveragedModel with ``get_ema_multi_avg_fn`` (a test compares them).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class Ema:
    """``module`` holds the average; :meth:`update` after each optimiser step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.started = decay, False

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        return ours, theirs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights (the first update copies them)."""
        ours, theirs = self._pairs(model)
        floats = [(a, b.detach()) for a, b in zip(ours, theirs, strict=True) if a.is_floating_point()]
        others = [(a, b) for a, b in zip(ours, theirs, strict=True) if not a.is_floating_point()]
        if not self.started:
            torch._foreach_copy_([a for a, _ in floats], [b for _, b in floats])
            self.started = True
        elif floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay)
        for a, b in others:  # counters (num_batches_tracked): the model's own
            a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "started": self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Ours, or an AveragedModel's (``module.``-prefixed keys and ``n_averaged``: runs from before)."""
        if "started" in state:
            self.module.load_state_dict(state["module"])
            self.started = bool(state["started"])
            return
        weights = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
        self.module.load_state_dict(weights)
        self.started = int(state.get("n_averaged", 0)) > 0
