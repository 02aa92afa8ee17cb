"""The benchmarks' probes still run against the package (a probe that drifts from the API breaks `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pneumothorax.io import paths


@pytest.mark.trains
def test_memory_probe_submits_one_row_per_test_map() -> None:
    probe = paths.ROOT / "benchmarks" / "memory_probe.py"
    result = subprocess.run([sys.executable, str(probe), "12"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["images"] == 12 and figures["rows"] == 12
    assert 0 < figures["peak_after_infer_mb"] <= figures["peak_rss_mb"] and figures["rle_mb"] > 0
