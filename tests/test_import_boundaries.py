"""The serving code never pulls in TensorFlow, Keras, tf2onnx, or the training/export packages.

The service installs without TensorFlow (see pyproject.toml), so one stray import would break it at start-up.
Every module under service/ is checked, including ones added later.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"
FORBIDDEN_RUNTIME = ("tensorflow", "keras", "tf2onnx")
FORBIDDEN_IMPORTS = (*FORBIDDEN_RUNTIME, "training", "export")
# The modules the brief names as the serving core: they must exist, so a rename cannot empty this test.
CORE_MODULES = ("bundle", "engine", "pipeline", "preprocessing", "batching")


def service_modules() -> list[str]:
    return sorted(f"service.{path.stem}" if path.stem != "__init__" else "service" for path in SERVICE.glob("*.py"))


def service_files() -> list[Path]:
    return sorted(SERVICE.rglob("*.py"))


def test_core_service_modules_exist() -> None:
    modules = service_modules()
    for name in CORE_MODULES:
        assert f"service.{name}" in modules


def loaded_roots(modules: list[str] | tuple[str, ...]) -> set[str]:
    """Top-level packages loaded after importing `modules` in a fresh interpreter."""
    script = textwrap.dedent(
        """
        import importlib, json, sys
        for name in json.loads(sys.argv[1]):
            importlib.import_module(name)
        print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(list(modules))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_every_service_module_loads_no_tensorflow() -> None:
    loaded = loaded_roots(service_modules())
    assert "service" in loaded  # the probe really imported something
    assert "onnxruntime" in loaded  # ...including the engine
    leaked = sorted(loaded & set(FORBIDDEN_IMPORTS))
    assert leaked == [], f"importing {service_modules()} loaded {leaked}"


def _imported_roots(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


@pytest.mark.parametrize("path", service_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_service_source_has_no_forbidden_import(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [f"{path.name}:{line} imports {root}" for line, root in _imported_roots(tree) if root in FORBIDDEN_IMPORTS]
    assert bad == []


def test_static_check_catches_forbidden_imports() -> None:
    source = textwrap.dedent(
        """
        import numpy as np
        import tensorflow as tf
        from keras import layers
        from export.build import export_bundle
        import importlib
        importlib.import_module("tf2onnx.convert")
        def later():
            from training.architecture import build_router
        from .bundle import Bundle
        """
    )
    roots = {root for _, root in _imported_roots(ast.parse(source))}
    assert roots & set(FORBIDDEN_IMPORTS) == {"tensorflow", "keras", "export", "tf2onnx", "training"}
    assert "numpy" in roots


# `bfd evaluate` runs where the service runs (no TensorFlow installed), and the dataset code is shared with it.
TENSORFLOW_FREE_TRAINING = (
    "training.dataset",
    "training.splits",
    "training.metrics",
    "training.synthetic",
    "training.evaluate",
    "training.evaluate_cli",
    "training.evaluation_report",
    "training.plots",
)


def test_evaluation_and_dataset_modules_load_no_tensorflow() -> None:
    loaded = loaded_roots(TENSORFLOW_FREE_TRAINING)
    assert {"training", "onnxruntime", "matplotlib"} <= loaded
    assert sorted(loaded & set(FORBIDDEN_RUNTIME)) == []
