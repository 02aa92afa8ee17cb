"""TTA flips back; fold ensembling averages."""

from __future__ import annotations

import torch
from torch import nn

from pneumothorax.models import tta


class Ramp(nn.Module):
    """A left-right asymmetric model: its output depends on the column and on the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.linspace(-2, 2, x.shape[-1]).view(1, 1, 1, -1)
        return x[:, :1] * 0.5 + cols


def test_hflip_tta_equals_manual_flip():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    model = Ramp()
    got = tta.predict_batch([model], x, ["hflip"])
    manual = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1)) / 2
    torch.testing.assert_close(got, manual)
    assert not torch.allclose(got, torch.sigmoid(model(x)))  # the flip did change something
    vh = tta.predict_batch([model], x, ["hflip", "vflip"])
    manual3 = (
        torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1) + torch.sigmoid(model(x.flip(-2))).flip(-2)
    ) / 3
    torch.testing.assert_close(vh, manual3)


def test_tta_on_cpu_runs_one_pass_per_view():
    seen = []

    class Recorder(Ramp):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    tta.predict_batch([Recorder()], torch.randn(3, 1, 8, 8), ["hflip", "vflip"])
    assert seen == [3, 3, 3]  # not one pass of 9: on CPU a doubled batch costs more than two passes


def test_fold_ensemble_is_the_mean():
    x = torch.randn(2, 1, 4, 4)

    class Const(nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x):
            return torch.full_like(x[:, :1], self.v)

    got = tta.predict_batch([Const(0.0), Const(2.0)], x, [])
    torch.testing.assert_close(got, torch.full_like(got, (0.5 + torch.sigmoid(torch.tensor(2.0)).item()) / 2))


def test_the_inference_loader_with_workers_gives_the_batches_of_one_without():
    """OOF and test maps load with ``data.workers`` processes on a GPU box (``auto``); a worker must not change a
    batch or its order (and the loader must start at all: a missing import once failed only with workers)."""
    data = torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1))
    batches = {w: [b[0] for b in tta.inference_loader(data, 3, w, torch.device("cpu"))] for w in (0, 2)}
    assert [b.shape[0] for b in batches[2]] == [3, 3, 3, 1]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))
