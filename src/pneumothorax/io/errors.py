"""The errors a user can cause and fix: one base, :class:`PipelineError`, which every script reports in one line.

Each error of the pipeline derives from it (and from the builtin it used to be, so ``except ValueError``
still catches a :class:`~pneumothorax.io.config.ConfigError`). ``pipeline.cli.run`` catches this one class,
prints ``error: <message>`` naming the file, row or key, and exits 2. The torch-side errors live here,
not beside the code that raises them, so that ``cli`` imports no torch.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Bad input or a missing step's output: the message names the file, row or key and what to do."""


class MissingFileError(PipelineError, FileNotFoundError):
    """A file the step needs does not exist yet (a step not run, a wrong folder)."""


class WeightsError(PipelineError, RuntimeError):
    """Pretrained weights that cannot be obtained or do not fit the model."""


class DeviceError(PipelineError, RuntimeError):
    """A GPU is there but torch cannot use it; the message says why and what to do."""
