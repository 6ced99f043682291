"""The layering ARCHITECTURE.md promises: dependencies point only down, with no circles.

Every ``import`` in ``src/eplb`` is read (function-level ones too, so a climbing import
cannot hide inside a function) and checked against the layer order.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# bottom to top; a module may import its own layer or any layer below
LAYERS = (
    ("eplb._version",),
    ("eplb.core",),
    ("eplb.online",),
    ("eplb.api",),
    ("eplb.formats",),
    ("eplb.tools",),
    ("eplb.integrations",),
    ("eplb.cli", "eplb.__main__"),
    ("eplb",),  # the package __init__: the public API, imports from anything below
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, module
    return best[0]


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """``(imported eplb module, line)`` for every import in ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # "from eplb.core import placement" imports a submodule, not the package's
            # own code: only the submodule is a dependency (the package __init__ runs
            # first either way); a name defined in the package's __init__ is one on it
            subs = [f"{name}.{alias.name}" for alias in node.names]
            if not all(sub in MODULES for sub in subs):
                out.append((name, node.lineno))
            out += [(sub, node.lineno) for sub in subs]
    return [(name, line) for name, line in out if name == "eplb" or name.startswith("eplb.")]


MODULES = {_module_name(p): p for p in sorted((SRC / "eplb").rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The eplb module an import refers to (a name imported from a module maps to it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_has_a_named_layer() -> None:
    """Only the package ``__init__`` sits in the top layer, ``"eplb"``: a new top-level
    module (``eplb/utils.py``) fell into it by prefix and could import the CLI unflagged."""
    top = len(LAYERS) - 1
    unplaced = [m for m in MODULES if m != "eplb" and _layer(m) == top]
    assert not unplaced, f"place these modules in LAYERS and ARCHITECTURE.md: {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    own = _layer(module)
    climbing = []
    for name, line in _imports(MODULES[module], module):
        target = _resolve(name)
        if target is not None and _layer(target) > own:
            climbing.append(f"line {line}: imports {target}")
    assert not climbing, f"{module} imports a higher layer: {climbing}"


def test_no_import_cycles() -> None:
    graph = {
        module: {
            t for name, _ in _imports(path, module) if (t := _resolve(name)) and t != module
        }
        for module, path in MODULES.items()
    }
    # package __init__s count: some hold code (core.packing, core.policies), and a module
    # importing a name from its own package's __init__ while that __init__ imports the
    # module is a real cycle ("from pkg import submodule" is no edge to pkg, see _imports)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def _function_level_imports(path: Path, module: str) -> list[tuple[str, int]]:
    """``(eplb module, line)`` for every eplb import inside a function body."""
    inner = {
        node.lineno
        for func in ast.walk(ast.parse(path.read_text()))
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(func)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    return [(name, line) for name, line in _imports(path, module) if line in inner]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_eplb_imports_at_module_level(module: str) -> None:
    """An eplb import inside a function hides a dependency (or dodges a cycle). Other
    packages' imports are not checked here: optional ones (matplotlib, YAML, the engines)
    load lazily on purpose."""
    lazy = _function_level_imports(MODULES[module], module)
    assert not lazy, f"{module} imports eplb modules inside functions: {lazy}"


def _dynamic_eplb_imports(path: Path) -> list[tuple[str, int]]:
    """``(named module, line)`` for every ``importlib.import_module`` / ``__import__`` call
    whose name is text (or an f-string's text up to its first field) naming eplb."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called not in ("import_module", "__import__"):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.JoinedStr):
            arg = arg.values[0] if arg.values else arg
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            out.append((arg.value.rstrip("."), node.lineno))
    # (a name held in a variable is an engine's module: sglang.py checks SGLang's hook)
    return [(name, line) for name, line in out if name == "eplb" or name.startswith("eplb.")]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dynamic_eplb_imports_stay_in_their_package(module: str) -> None:
    """An ``importlib`` import is invisible to the checks above: the CLI's lazy commands
    (``eplb.cli.<command>``) may import their own package's modules, nothing else."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    outside = [f"line {line}: {name}" for name, line in _dynamic_eplb_imports(MODULES[module])
               if not (name == package or name.startswith(package + "."))]
    assert not outside, f"{module} imports eplb modules by name outside its package: {outside}"


#: eplb.core's own layers, bottom to top, as core/__init__.py states them
CORE_ORDER = (
    "messages",
    "topology", "inputs", "expert_ids", "map_tables", "placement", "trace", "options", "request",
    "ordering",
    "device_path", "replication", "count_fillers", "count_bounds", "companion_bound",
    "tiny_counts", "packing",
    "small_slots",
    "bounds",
    "dispatch", "node_labels", "node_repair", "dispatch_plan", "rank_draws", "locality", "policies",
    "planner",
    "baselines",
)


def test_core_modules_point_down() -> None:
    """Inside core each module imports only those before it in ``CORE_ORDER``."""
    def part(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[:2] == ["eplb", "core"] else None

    climbing, unknown = [], []
    for module, path in MODULES.items():
        own = part(module)
        if own is None:
            continue
        if own not in CORE_ORDER:
            unknown.append(module)
            continue
        for name, line in _imports(path, module):
            target = _resolve(name)
            dep = part(target) if target else None
            if dep and dep != own and CORE_ORDER.index(dep) > CORE_ORDER.index(own):
                climbing.append(f"{module} line {line}: imports {target}")
    assert not unknown, f"place these in CORE_ORDER and core/__init__.py: {unknown}"
    assert not climbing, f"core modules import a later core module: {climbing}"


def test_modules_stay_readable() -> None:
    """Files under ~600 lines: a module that grows past that holds more than one idea."""
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 620}
    assert not long, f"split these modules: {long}"


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` (``eplb.x.y``) names a module, or a name inside one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_docstring_references_name_modules_that_exist() -> None:
    """Every ``:func:`` / ``:mod:`` / ... reference to an ``eplb.`` name in the sources,
    and every such name quoted as code, resolves: modules moved into ``eplb.core`` (and
    helpers moved into ``tests/``) left references such as
    ``eplb.replication.replica_counts`` and ``eplb.tools.sglang_dispatch`` behind."""
    reference = re.compile(r"(?::(?:func|class|mod|data|meth|attr|exc):`~?|``)"
                           r"(eplb(?:\.\w+)+)(?:\(\))?`")
    stale = [f"{module}: {name}" for module, path in MODULES.items()
             for name in sorted(set(reference.findall(path.read_text())))
             if name != "eplb.py" and not _resolves(name)]  # (DeepSeek's file)
    assert not stale, f"docstrings name what does not exist: {stale}"
