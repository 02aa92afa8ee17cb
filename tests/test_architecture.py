"""The layers are folders (io -> data -> models -> train -> predict -> post -> pipeline), imports point one way
between them, none hides inside a function, and no function grows past the size people can read."""

from __future__ import annotations

import ast
import gc
import json
import subprocess
import sys

import pytest

from pneumothorax.io import paths
from pneumothorax.io.errors import PipelineError
from pneumothorax.pipeline import cli

PACKAGE = paths.ROOT / "src" / "pneumothorax"
LAYERS = ["io", "data", "models", "train", "predict", "post", "pipeline"]
"""The layer folders, lowest first: a module imports only from its own layer and the ones before it."""
MODULES = {f"{p.parent.name}.{p.stem}": p for p in PACKAGE.glob("*/*.py") if p.stem != "__init__"}
LAYER_OF = {name: LAYERS.index(name.split(".")[0]) for name in MODULES}


def _package_imports(tree: ast.AST, module: str) -> list[tuple[str, ast.AST]]:
    """(layer, node) for every import of a pneumothorax module, wherever it is (absolute or relative)."""
    found = []
    package = module.split(".")[0]
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        name = node.module or ""
        if node.level == 1:
            found.append((package, node))
        elif node.level == 2:
            found.append(((name or node.names[0].name).split(".")[0], node))
        elif name.startswith("pneumothorax."):
            found.append((name.split(".")[1], node))
        elif name == "pneumothorax":
            found += [(alias.name, node) for alias in node.names if not alias.name.startswith("__")]
    return found


def _function_nodes(tree: ast.AST) -> list[ast.AST]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_the_package_is_its_layer_folders():
    """Every module sits in a layer folder; the package root holds only ``__init__``; the folders are the layers."""
    assert {p.name for p in PACKAGE.glob("*.py")} == {"__init__.py"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == set(LAYERS)
    assert all((PACKAGE / layer / "__init__.py").exists() for layer in LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way_and_sit_at_the_top(module):
    tree = ast.parse(MODULES[module].read_text())
    inside = {id(node) for fn in _function_nodes(tree) for node in ast.walk(fn)}
    for layer, node in _package_imports(tree, module):
        assert id(node) not in inside, f"{module}.py:{node.lineno} imports from {layer} inside a function"
        assert layer in LAYERS, f"{module}.py:{node.lineno} imports {layer}, which is not a layer"
        assert LAYERS.index(layer) <= LAYER_OF[module], (
            f"{module} (layer {LAYER_OF[module]}) imports from {layer} (layer {LAYERS.index(layer)}): "
            "imports must point one way"
        )


def test_layer_packages_import_nothing():
    """A layer's ``__init__`` is a docstring: importing one module never drags in a layer (submit stays torch-free)."""
    for layer in LAYERS:
        tree = ast.parse((PACKAGE / layer / "__init__.py").read_text())
        assert all(isinstance(node, ast.Expr) for node in tree.body), layer


def test_functions_stay_short():
    long = []
    for path in [*PACKAGE.rglob("*.py"), *(paths.ROOT / "scripts").glob("*.py")]:
        for fn in _function_nodes(ast.parse(path.read_text())):
            if fn.end_lineno - fn.lineno + 1 > 60:
                long.append(f"{path.name}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)")
    assert not long


NO_MODEL_SCRIPTS = [
    "01_prepare",
    "02_folds",
    "07_search_postprocess",
    "08_submit",
    "09_score",
    "10_report",
    "13_leaderboard",
    "15_submit_to_kaggle",
]
MODEL_SCRIPTS = ["03_train_classifier", "04_train_segmentation", "05_predict_oof", "06_infer", "12_predict"]


def _first_loads(scripts: list[str], modules: set[str]) -> dict[str, list[str]]:
    """Which of ``modules`` each script's imports load first: one Python imports the scripts' imports in turn
    (a module loaded once stays loaded, so a script is charged with what it adds; none is the same as none in
    one process each, at a fraction of the starts)."""
    probe = ["import json, sys", "found = {}"]
    for script in scripts:
        source = (paths.ROOT / "scripts" / f"{script}.py").read_text()
        probe += [line for line in source.splitlines() if line.startswith(("from pneumothorax", "import "))]
        probe.append(
            f"found[{script!r}] = sorted(set({sorted(modules)!r}) & set(sys.modules) - {{*sum(found.values(), [])}})"
        )
    probe.append("print(json.dumps({k: v for k, v in found.items() if v}))")
    result = subprocess.run([sys.executable, "-c", "\n".join(probe)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_scripts_that_build_no_model_import_no_torch():
    """Submit, score and the leaderboard start in about a second: torch, timm and smp take three or four."""
    assert _first_loads(NO_MODEL_SCRIPTS, {"torch", "timm", "segmentation_models_pytorch"}) == {}


def test_training_and_inference_load_no_scikit_learn():
    """scikit-learn (with scipy.stats) costs a second of every process that imports it; only ``make folds``
    needs it (``data.splitting``), and the gate's metrics are counted (``classifier.gate_metrics``)."""
    assert _first_loads([*MODEL_SCRIPTS, "07_search_postprocess"], {"sklearn", "scipy.stats"}) == {}


def test_inference_loads_no_augmentation_library():
    """Only training augments: the processes that only predict load the trained folds through
    ``models.trained`` and the datasets without albumentations (about 0.6 s of each start)."""
    assert _first_loads(["05_predict_oof", "06_infer", "12_predict"], {"albumentations"}) == {}


def test_the_probe_charges_each_script_with_what_it_loads():
    """The probe above can fail: ``02_folds`` makes the split with scikit-learn."""
    assert _first_loads(["01_prepare", "02_folds", "08_submit"], {"sklearn"}) == {"02_folds": ["sklearn"]}


def test_a_script_freezes_its_objects_before_the_interpreter_exits():
    """The interpreter's last collection walks every object torch, timm and sympy made (2-3 s a script on
    2 cores); ``cli.run`` freezes them first, on success and on a one-line error alike."""
    gc.unfreeze()
    try:
        cli.run(lambda: None)
        assert gc.get_freeze_count() > 0
        gc.unfreeze()

        def fails() -> None:
            raise PipelineError("bad input")

        with pytest.raises(SystemExit):
            cli.run(fails)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_script_pauses_collection_during_its_imports_and_main_runs_with_it_resumed():
    """Collection walking the objects torch & co. make while they import costs 1.5-2 s of each start: every script
    pauses it before its first import, and ``cli.run`` freezes what the imports made and resumes it."""
    for script in sorted((paths.ROOT / "scripts").glob("*.py")):
        body = ast.parse(script.read_text()).body[1:]  # after the docstring
        first_call = next(i for i, node in enumerate(body) if not isinstance(node, ast.Import | ast.ImportFrom))
        assert ast.unparse(body[first_call]) == "gc.disable()" and ast.unparse(body[0]) == "import gc", script.name
        assert all(isinstance(node, ast.Import | ast.ImportFrom) for node in body[:first_call]), script.name
    seen = []
    gc.disable()
    try:
        cli.run(lambda: seen.append((gc.isenabled(), gc.get_freeze_count())))
        assert seen[0][0] and seen[0][1] > 0
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_code_passes_ruff():
    """Undefined names and unused imports fail here, not on the first GPU box (a worker-only code path once
    called a module it never imported; CPU runs with ``workers: 0`` never reached it)."""
    targets = [str(paths.ROOT / name) for name in ("src", "scripts", "tests", "benchmarks")]
    command = [sys.executable, "-m", "ruff", "check", "--quiet", *targets]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
