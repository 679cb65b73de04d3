"""Import boundaries: the core knows no door, the batcher knows only the standard library, nothing imports up.

- `inference/` (the core) imports no web framework, database, metrics library or TensorFlow, and nothing of
  `service`, `clients`, `training`, `export`, `desktop` or `loadtest`;
- `inference.batching`, `inference.service_rate`, `inference.memory_budget`, `inference.worker_pool` and
  `inference.backoff` import only the standard library (and one another);
- `service/` (the HTTP door) and `clients/` import no TensorFlow and nothing of `training` or `export`;
- `training/`, `export/`, `desktop/`, `loadtest/` and `clients/` import the core, never the HTTP service;
- no project module takes part in an import cycle.
Each rule is checked statically on every file (so a module added later is covered) and, for the runtime
ones, by importing the modules in a fresh interpreter; each check is shown to bite on a made-up source.
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
PACKAGES = ("inference", "dicom_node", "service", "clients", "training", "export", "desktop", "loadtest", "bfd")
TENSORFLOW = ("tensorflow", "keras", "tf2onnx")
WEB_AND_STORE = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "asyncpg",
    "aiosqlite",
    "prometheus_client",
)
FORBIDDEN = {
    "inference": {
        *TENSORFLOW,
        *WEB_AND_STORE,
        "service",
        "clients",
        "dicom_node",
        "training",
        "export",
        "desktop",
        "loadtest",
    },
    # The DICOM door: the core plus DIMSE/DICOMweb libraries; its storage comes in through a protocol.
    "dicom_node": {*TENSORFLOW, *WEB_AND_STORE, "service", "clients", "training", "export", "desktop", "loadtest"},
    "service": {*TENSORFLOW, "training", "export", "desktop", "loadtest"},
    "clients": {*TENSORFLOW, *WEB_AND_STORE, "service", "training", "export", "desktop", "loadtest"},
    "training": {"service", "clients", "desktop", "loadtest"},
    "export": {"service", "clients", "training.run", "desktop", "loadtest"},
    "desktop": {*TENSORFLOW, *WEB_AND_STORE, "service", "training", "export", "loadtest"},
    "loadtest": {"service.main", "service.api", "service.predictor", "training", "clients", "desktop"},
}
STDLIB_ONLY = (
    "inference.batching",
    "inference.service_rate",
    "inference.memory_budget",
    "inference.worker_pool",
    "inference.backoff",
)


def modules_of(package: str) -> list[str]:
    """Every module of a package, by its dotted name (new modules are covered without editing this test)."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" in path.parts:  # Alembic's scripts are loaded by Alembic, not imported
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module name) of every absolute import, including importlib.import_module("...")."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str, forbidden: set[str]) -> list[str]:
    """The imports of `source` that name a forbidden module or anything under it."""
    bad = []
    for line, name in imported_names(ast.parse(source)):
        if any(name == f or name.startswith(f + ".") for f in forbidden):
            bad.append(f"line {line}: {name}")
    return bad


def module_file(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_across_its_boundary(package: str) -> None:
    modules = modules_of(package)
    assert modules, f"{package}/ has no modules: the layout changed under this test"
    bad = {m: v for m in modules if (v := violations(module_file(m).read_text(encoding="utf-8"), FORBIDDEN[package]))}
    assert bad == {}


def test_the_batcher_and_budgets_import_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__", *STDLIB_ONLY}
    for module in STDLIB_ONLY:
        names = {name for _, name in imported_names(ast.parse(module_file(module).read_text(encoding="utf-8")))}
        outside = sorted(n for n in names if n.split(".")[0] not in allowed and n not in allowed)
        assert all(n.startswith(STDLIB_ONLY) for n in outside if n.startswith("inference")), (module, outside)
        assert [n for n in outside if not n.startswith("inference")] == [], (module, outside)


def test_the_static_check_bites() -> None:
    source = textwrap.dedent(
        """
        import numpy as np
        from fastapi import FastAPI
        from service.errors import ServiceError
        import importlib
        importlib.import_module("tensorflow.keras")
        def later():
            from training.architecture import build_router
        from .bundle import Bundle
        """
    )
    found = violations(source, FORBIDDEN["inference"])
    assert [v.split(": ")[1] for v in found] == [
        "fastapi",
        "fastapi.FastAPI",
        "service.errors",
        "service.errors.ServiceError",
        "tensorflow.keras",
        "training.architecture",
        "training.architecture.build_router",
    ]


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


def test_importing_the_whole_core_loads_no_door_and_no_tensorflow() -> None:
    loaded = loaded_roots(modules_of("inference"))
    assert {"inference", "onnxruntime", "pydicom"} <= loaded  # the probe really imported the engine and DICOM
    assert sorted(loaded & FORBIDDEN["inference"]) == []


def test_importing_the_service_loads_no_tensorflow() -> None:
    loaded = loaded_roots(modules_of("service"))
    assert {"service", "inference", "fastapi", "sqlalchemy"} <= loaded
    assert sorted(loaded & set(TENSORFLOW)) == []


def test_loading_settings_does_not_load_onnxruntime() -> None:
    assert "onnxruntime" not in loaded_roots(["service.settings"])


def test_the_predictor_and_the_http_app_load_no_dicom_node_libraries() -> None:
    """highdicom and pynetdicom cost half a second to import: loaded only when DICOM objects are built or the
    node is on, not by every start of the service, the desktop or the CLI."""
    loaded = loaded_roots(["inference.predictor", "inference.runner", "service.main", "service.settings"])
    assert {"inference", "service"} <= loaded
    assert sorted(loaded & {"highdicom", "pynetdicom", "dicomweb_client"}) == []


def test_the_desktop_and_the_cli_client_load_no_web_framework() -> None:
    loaded = loaded_roots(["desktop.client", "desktop.report", "clients.predict_cli", "clients.http"])
    assert sorted(loaded & {"fastapi", "starlette", "uvicorn", "sqlalchemy", *TENSORFLOW}) == []


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
    "training.fracatlas",
    "training.external",
    "training.localisation",
)


def test_evaluation_and_dataset_modules_load_no_tensorflow() -> None:
    loaded = loaded_roots(TENSORFLOW_FREE_TRAINING)
    assert {"training", "onnxruntime", "matplotlib"} <= loaded
    assert sorted(loaded & set(TENSORFLOW)) == []


# --- no import cycles -----------------------------------------------------------------------------------------


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from package import module` counts as the module)."""
    modules = {m for package in PACKAGES for m in modules_of(package)}
    graph: dict[str, set[str]] = {}
    for module in modules:
        edges = set()
        for _, name in imported_names(ast.parse(module_file(module).read_text(encoding="utf-8"))):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own __init__
                edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    graph = project_graph()
    assert len(graph) > 60  # every package was read
    assert find_cycle(graph) is None


def test_the_cycle_finder_bites() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
