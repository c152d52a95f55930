"""The package's shape: every module imports, the layers go downhill (no import cycle), the library never
imports typer, and the command line installs as ``partkit.cli`` (never a top-level ``commands``)."""
import ast
import importlib
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE_DIRS = {"partkit": ROOT / "partkit", "partkit.cli": ROOT / "commands"}


def _modules() -> dict[str, Path]:
    """Every module of partkit and partkit.cli in the source tree: dotted name -> file."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if "__pycache__" in parts:
                continue
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, lazy: bool):
    """Import statements that run when the module is imported (``lazy``: also those in function bodies),
    never those under ``if TYPE_CHECKING:``."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if lazy:
                stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.stmt) or isinstance(node, ast.excepthandler):
            stack.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler)))


def _import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the partkit modules its imports load (the most specific module each names); module-level
    imports only unless ``lazy``."""
    graph = {}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), lazy):
            if isinstance(node, ast.Import):
                bases, names = [a.name for a in node.names], []
            else:
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module
                bases, names = [base], [a.name for a in node.names]
            for base in bases:
                for candidate in [f"{base}.{n}" for n in names] or [base]:
                    # `from .io import tario` names the module partkit.io.tario; `from .io import Output` the package.
                    module = candidate if candidate in MODULES else base
                    while module not in MODULES and "." in module:
                        module = module.rpartition(".")[0]
                    if module in MODULES and module != name:
                        targets.add(module)
        graph[name] = targets
    return graph


def _find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None


def test_the_tree_holds_both_packages():
    assert "partkit.cli.main" in MODULES and "partkit.io.tario" in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == MODULES[name].resolve(), \
        f"{name} imported from {module.__file__}, not this tree; reinstall with `pip install -e .`"


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-lazy-imports"])
def test_no_import_cycle(lazy):
    # Lazy (in-function) imports count too: a cycle hidden in a function (pack <-> pointcloud once) is still
    # two modules that each need the other, i.e. a concept without one owner.
    cycle = _find_cycle(_import_graph(lazy))
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + \
        " (give the shared name one owner that both modules import, lower in the layers)"


def test_cycle_finder_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_never_imports_typer():
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("partkit.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [node.module.split(".")[0]]
            else:
                continue
            if {"typer", "click"} & set(roots):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "the library imports typer/click (only commands/ may): " + ", ".join(offenders)


def test_cli_installs_as_partkit_cli_not_commands():
    import partkit.cli.main

    assert partkit.cli.main.__package__ == "partkit.cli"
    # commands/ is only a folder of the checkout: its modules import each other relatively, never as `commands`.
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(m.split(".")[0] == "commands" for m in modules), f"{path}:{node.lineno} imports commands"


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    missing = sorted(packages - set(setuptools["packages"]))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml (a wheel would lack them)"
    assert setuptools["package-dir"] == {"partkit.cli": "commands"}
    assert config["project"]["scripts"] == {"partkit": "partkit.cli.main:main"}


def test_architecture_names_every_module():
    """ARCHITECTURE.md says which concern each module owns: every module file is named there."""
    text = re.sub(r"```.*?```", "", (ROOT / "ARCHITECTURE.md").read_text(), flags=re.S)
    named = set(re.findall(r"`([^`]+)`", text))
    words = {w for chunk in named for w in re.split(r"[^\w]+", chunk) if w}
    missing = []
    for path in sorted((ROOT / "partkit").rglob("*.py")) + sorted((ROOT / "commands").glob("*.py")):
        if path.name == "__init__.py" or path.name == "_version.py":
            continue
        if path.stem not in words:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules ARCHITECTURE.md does not name: {missing}"
