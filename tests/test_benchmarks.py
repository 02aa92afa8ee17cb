"""The benchmarks' probes still run against the package (a probe that drifts from the API breaks `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pneumothorax.io import paths

sys.path.insert(0, str(paths.ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (a script folder, not a package)


@pytest.mark.trains
def test_memory_probe_submits_one_row_per_test_map() -> None:
    probe = paths.ROOT / "benchmarks" / "memory_probe.py"
    result = subprocess.run([sys.executable, str(probe), "12"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["images"] == 12 and figures["rows"] == 12
    assert 0 < figures["peak_after_infer_mb"] <= figures["peak_rss_mb"] and figures["rle_mb"] > 0


def test_gpu_check_ddp_script_accumulates_like_plain_training(tmp_path) -> None:
    """gpu-check's one-rank DDP script, run here on gloo: no_sync then a synced half-batch gives plain accumulation's
    gradients (the GPU run found the script itself calling no_sync on the bare model that one rank trains)."""
    out = gpu_check._torchrun(1, gpu_check.DDP_SCRIPT, tmp_path, "cpu")
    assert float(out.split("GAP")[-1]) < 1e-6
