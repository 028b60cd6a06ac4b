"""The package's import graph: no cycle, and the layers import downwards only (the readers, networks
and inferers know nothing of the batch job, the training engines, MONAI Label or the command line)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "pipelines"
LOWER = ("pipelines.io", "pipelines.networks", "pipelines.inference", "pipelines.runtime", "pipelines.visualize")
UPPER = ("pipelines.batch", "pipelines.engines", "pipelines.label", "pipelines.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The ``pipelines`` modules ``path`` imports, at module level or inside functions (relative
    imports resolved, ``if TYPE_CHECKING:`` blocks left out); ``from a import b`` counts as ``a.b``
    when that is a module, else ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING" for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never run
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def test_no_module_imports_itself_back():
    """Strongly connected components of more than one module (Tarjan), packages and their own
    submodules aside: importing a submodule runs its package's ``__init__`` by design."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def edges(name: str) -> set[str]:
        return {m for m in GRAPH[name] if not (m.startswith(name + ".") or name.startswith(m + "."))}

    def visit(name: str) -> None:
        index[name] = low[name] = counter[0]
        counter[0] += 1
        stack.append(name)
        on_stack.add(name)
        for other in edges(name):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in on_stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_import_no_upper_one(lower):
    offenders = {
        name: sorted(m for m in targets if m.startswith(UPPER))
        for name, targets in GRAPH.items()
        if (name == lower or name.startswith(lower + ".")) and any(m.startswith(UPPER) for m in targets)
    }
    assert not offenders, offenders


def test_the_graph_is_read():
    """The checks above see real imports (a broken parser would find no edges and pass)."""
    assert "pipelines.io.dicom.scan" in GRAPH["pipelines.io.dicom.series"]
    assert "pipelines.batch.plan" in GRAPH["pipelines.batch.runner"]
    assert "pipelines.io.formats" in GRAPH["pipelines.io"]  # relative import in a package __init__


BATCH = PACKAGE / "batch"
# what the batch package may import inside a function: MONAI and what loads it (it takes seconds and
# imports Ignite, which `import pipelines.batch` must not: tests/test_visualize.py), and the optional
# OpenVINO and NNCF (the openvino extra)
LATE = ("monai", "pipelines.io", "pipelines.transforms", "pipelines.metrics", "pipelines.inference", "openvino", "nncf")


def test_the_batch_modules_are_small_and_import_at_the_top():
    """Rooms that show the stages: no module of ``pipelines.batch`` over about 300 lines, and imports
    inside functions only for MONAI and what loads it (or for annotations)."""
    long = {p.relative_to(REPO).as_posix(): n for p in BATCH.rglob("*.py") if (n := len(p.read_text().splitlines())) > 330}
    assert not long, long
    late = []
    for path in BATCH.rglob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING" for n in ast.walk(block)}
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only:
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    late += [f"{path.name}:{node.lineno} {n}" for n in names if not str(n).startswith(LATE)]
    assert not late, late
