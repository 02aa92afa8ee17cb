"""Imports point one way (format I/O -> data -> models -> training -> prediction -> post-processing ->
steps), none hides inside a function, and no function grows past the size people can read."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from pneumothorax import paths

PACKAGE = paths.ROOT / "src" / "pneumothorax"
LAYERS = [
    {
        "paths",
        "errors",
        "files",
        "pools",
        "bars",
        "plots",
        "rle",
        "dicom",
        "dicom_seg",
        "metric",
        "scale",
        "layout",
        "manifest",
        "config",
        "gpus",
    },
    {"prepare", "folds", "data", "synthetic"},
    {"models", "losses", "devices", "tta"},
    {"checkpoints", "trainer", "segmentation", "classifier"},
    {"infer"},
    {"postprocess", "thresholds", "submission"},
    {"steps", "report", "ensemble", "predict", "leaderboard", "ablation", "cli", "query"},
]
LAYER_OF = {name: k for k, layer in enumerate(LAYERS) for name in layer}


def _package_imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """(module, node) for every import of a pneumothorax module, wherever it is."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            # ``from . import __version__``: an attribute of the package's __init__, which imports nothing
            found += [(name.split(".")[0], node) for name in names if not name.startswith("__")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumothorax"):
            found += [(alias.name, node) for alias in node.names]
    return found


def _function_nodes(tree: ast.AST) -> list[ast.AST]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYER_OF), f"unplaced: {modules - set(LAYER_OF)}, gone: {set(LAYER_OF) - modules}"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_imports_point_one_way_and_sit_at_the_top(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    inside = {id(node) for fn in _function_nodes(tree) for node in ast.walk(fn)}
    for name, node in _package_imports(tree):
        assert id(node) not in inside, f"{module}.py:{node.lineno} imports {name} inside a function"
        assert LAYER_OF[name] <= LAYER_OF[module], (
            f"{module} (layer {LAYER_OF[module]}) imports {name} (layer {LAYER_OF[name]}): imports must point one way"
        )


def test_functions_stay_short():
    long = []
    for path in [*PACKAGE.glob("*.py"), *(paths.ROOT / "scripts").glob("*.py")]:
        for fn in _function_nodes(ast.parse(path.read_text())):
            if fn.end_lineno - fn.lineno + 1 > 60:
                long.append(f"{path.name}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)")
    assert not long


@pytest.mark.parametrize("script", ["07_submit", "08_score", "12_leaderboard"])
def test_scripts_that_build_no_model_import_no_torch(script):
    """Submit, score and the leaderboard start in about a second: torch, timm and smp take three or four."""
    source = (paths.ROOT / "scripts" / f"{script}.py").read_text()
    imports = "\n".join(line for line in source.splitlines() if line.startswith(("from pneumothorax", "import ")))
    probe = imports + "\nimport sys\nprint(sorted({'torch', 'timm', 'segmentation_models_pytorch'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"{script}.py imports {loaded.strip()}"
