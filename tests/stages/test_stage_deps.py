"""dvc.yaml's code deps follow the imports: each stage's transitive imports inside the package are
covered by its deps, no stage reaches another, and imports flow one way between the packages.

The import graph is read from the sources with `ast` (every `import` and `from ... import`, also
inside functions), so a lazily imported module counts as much as one imported at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from helpers import REPO

SRC = REPO / "src"
PACKAGE = SRC / "mnist_cnn"
STAGES = sorted(p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__")
# The layers (docs/development.md draws them). A package imports from the layers before its own, and
# within itself; the packages of one layer are peers that never import each other, except the base
# modules, which do.
LAYERS = (
    ("__init__", "cli", "config", "paths", "files"),
    ("data",),
    ("core",),
    ("tracking", "evaluation"),
    ("serving",),
    ("registry",),
    ("stages", "tools"),
)


def module_file(name: str) -> Path | None:
    """The file of a dotted module name inside the package (a module or a package's __init__)."""
    if name != "mnist_cnn" and not name.startswith("mnist_cnn."):
        return None
    path = SRC.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """The package's files that `path` imports directly, with the __init__.py of every package on the way."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    files = set()
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            if (found := module_file(".".join(parts[:end]))) is not None:
                files.add(found)
    return files


def closure(start: Path) -> set[Path]:
    seen, todo = {start}, [start]
    while todo:
        for found in imported_files(todo.pop()) - seen:
            seen.add(found)
            todo.append(found)
    return seen


def code_deps(stage: dict) -> list[Path]:
    return [REPO / dep for dep in stage.get("deps", []) if dep.startswith("src/")]


def covers(deps: list[Path], path: Path) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


def top_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def layer_of(path: Path) -> int:
    return next(i for i, names in enumerate(LAYERS) if top_of(path) in names)


def may_import(source: Path, target: Path) -> bool:
    same = top_of(source) == top_of(target) or layer_of(source) == layer_of(target) == 0
    return same or layer_of(target) < layer_of(source)


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(command: str) -> str:
    return command.split(" -m ")[1].split()[0]


def runs_first(module: str) -> set[Path]:
    """What `python -m a.b.c` runs before a/b/c.py: a/__init__.py and a/b/__init__.py."""
    parts = module.split(".")
    return {found for end in range(1, len(parts)) if (found := module_file(".".join(parts[:end]))) is not None}


def test_every_stage_module_is_a_dvc_stage_and_back() -> None:
    modules = {stage_module(stage["cmd"]) for stage in dvc_stages().values()}
    assert modules == {f"mnist_cnn.stages.{name}" for name in STAGES}


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_the_deps_cover_every_module_the_stage_imports(name: str) -> None:
    stage = dvc_stages()[name]
    start = module_file(stage_module(stage["cmd"]))
    assert start is not None, stage["cmd"]
    deps = code_deps(stage)
    run = closure(start).union(*(closure(init) for init in runs_first(stage_module(stage["cmd"]))))
    missing = sorted(str(p.relative_to(REPO)) for p in run if not covers(deps, p))
    assert not missing, f"stage {name}: dvc.yaml's deps miss {', '.join(missing)}"
    assert all(dep.exists() for dep in deps), deps


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_no_stage_reaches_another_or_a_tool(name: str) -> None:
    stage = dvc_stages()[name]
    start = module_file(stage_module(stage["cmd"]))
    reached = {p for p in closure(start) - {start} if p.parent.name in ("stages", "tools") and p.stem != "__init__"}
    assert not reached, f"stage {name} imports {sorted(str(p.relative_to(REPO)) for p in reached)}"
    tools = PACKAGE / "tools"
    assert not any(dep == tools or tools in dep.parents or dep in tools.parents for dep in code_deps(stage))


def test_every_package_has_a_layer() -> None:
    tops = {top_of(p) for p in PACKAGE.rglob("*.py")}
    assert tops == {name for names in LAYERS for name in names}


def test_imports_flow_one_way_between_the_packages() -> None:
    backwards = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for target in imported_files(path):
            if not may_import(path, target):
                backwards.append(f"{path.relative_to(SRC)} imports {target.relative_to(SRC)}")
    assert not backwards, backwards


def test_the_walker_sees_lazy_and_from_package_imports(tmp_path: Path) -> None:
    """The checks above are only as good as the walker: it follows an import inside a function and
    `from package import module`, and counts the packages' __init__.py."""
    predict = PACKAGE / "serving" / "predict.py"
    found = {str(p.relative_to(PACKAGE)) for p in imported_files(predict)}
    assert "tracking/store.py" in found  # imported inside registry_predictor()
    assert {
        "core/refusal.py",
        "core/__init__.py",
        "__init__.py",
    } <= found  # `from mnist_cnn.core import refusal`
    assert "tools/loadtest.py" not in {str(p.relative_to(PACKAGE)) for p in closure(predict)}
    # `python -m mnist_cnn.stages.train` runs both packages' __init__.py before the module
    assert runs_first("mnist_cnn.stages.train") == {PACKAGE / "__init__.py", PACKAGE / "stages" / "__init__.py"}
