"""The front door: the true Python minimum, dependencies declared once and locked once, the PyTorch build each
TORCH= value installs."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest

from pneumothorax.io import paths

PYPROJECT = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_txt_locks_exactly_the_declared_dependencies_and_extras():
    declared = {_name(r) for r in PYPROJECT["dependencies"]}
    for extra in PYPROJECT["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    lines = [line.split("#")[0].strip() for line in (paths.ROOT / "requirements.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+]*", pin) for pin in pins), pins  # every one pinned
    assert {_name(pin) for pin in pins} == declared
    assert {"dicom", "track", "kaggle", "dev"} <= set(PYPROJECT["optional-dependencies"])
    assert PYPROJECT["requires-python"] == ">=3.11"


def _install_plan(*args: str) -> subprocess.CompletedProcess:
    cmd = ["make", "--no-print-directory", "-C", str(paths.ROOT), "-n", "install", "VENV=/nonexistent/venv", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.make
@pytest.mark.parametrize("build", ["cu126", "cu128", "cu130", "cpu"])
def test_make_install_torch_picks_pytorchs_index_for_the_build(build):
    pins = [
        p for p in (paths.ROOT / "requirements.txt").read_text().split() if p.startswith(("torch==", "torchvision=="))
    ]
    plan = _install_plan(f"TORCH={build}").stdout.splitlines()
    pip = [line for line in plan if " -m pip install " in line]
    assert pip[0].endswith(f"{' '.join(pins)} --index-url https://download.pytorch.org/whl/{build}")
    assert pip[1].endswith("-r requirements.txt 2> >(grep -v 'is ignored' >&2)")  # then the lock, torch already there
    assert len(pip) == 3 and "--no-deps --no-build-isolation -e ." in pip[2]


@pytest.mark.make
def test_make_install_without_torch_takes_the_registrys_build_and_a_wrong_build_is_named():
    pip = [line for line in _install_plan().stdout.splitlines() if " -m pip install " in line]
    assert len(pip) == 2 and "-r requirements.txt" in pip[0] and "index-url" not in " ".join(pip)
    wrong = _install_plan("TORCH=cu999")
    assert wrong.returncode != 0 and "TORCH=cu999: use one of cu126 cu128 cu130 cpu" in wrong.stderr
