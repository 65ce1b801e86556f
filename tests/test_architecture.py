"""Imports in the ``steerkernel`` package only point down (docs/architecture.md).

Every module is parsed with ``ast`` (nothing is imported).  An import counts wherever it is
written: at module level, inside a function (a lazy import is still a dependency), under ``if``
or ``try``; relative imports are resolved, and so are ``importlib.import_module`` calls with a
constant name.  Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a``, so those
packages count as imported too (except the importer's own enclosing packages, which are already
being imported).

Checked:

* no import cycle between modules;
* nothing outside ``steerkernel.cli`` imports the CLI;
* every module belongs to a part (:data:`PARTS`, :data:`MODULE_PARTS`), and a part imports
  its own modules and parts of lower layers only (:data:`LAYERS`); parts of one layer are
  independent; a part beside the stack (:data:`SIDE_PARTS`) is imported only by the parts
  named there.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Optional, Set, Tuple

import pytest

PACKAGE = "steerkernel"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# ------------------------------------------------------------------------------ the layers
#: module-name prefix -> part (the longest matching prefix wins)
PARTS = {
    # base: no steerkernel imports but errors (and each other)
    "steerkernel.errors": "base",
    "steerkernel.requirements": "base",
    "steerkernel.fileio": "base",
    "steerkernel.limits": "base",
    "steerkernel.introspect": "base",
    "steerkernel.stats": "base",
    "steerkernel.models": "base",
    "steerkernel.data": "base",
    # kernels: the junction op, its reference, its registrations and backends
    "steerkernel.ops": "kernels",
    "steerkernel.backends": "kernels",
    "steerkernel._C": "kernels",
    # components, independent of each other
    "steerkernel.concepts": "concepts",
    "steerkernel.monitor": "monitor",
    "steerkernel.steering": "steering",
    "steerkernel.testing": "testing",
    # what the framework integrations share: one junction location of a served model
    "steerkernel.integrations.site": "site",
    # framework integrations, independent of each other
    "steerkernel.integrations.hf": "hf",
    "steerkernel.integrations.vllm": "vllm",
    "steerkernel.bench": "bench",
    # applications
    "steerkernel.live": "apps",
    "steerkernel.demo": "apps",
    "steerkernel.eval": "apps",
    "steerkernel.cli": "cli",
    "steerkernel.__main__": "cli",
}
#: packages whose ``__init__`` alone is a part (their other modules are placed by PARTS)
MODULE_PARTS = {
    "steerkernel.integrations": "integrations",  # attach(): dispatch by framework
    "steerkernel": "facade",  # steerkernel/__init__.py: the public names
}

#: lowest first.  A part may import its own modules and the parts of lower layers only.
LAYERS: List[Tuple[str, ...]] = [
    ("base",),
    ("kernels",),
    ("concepts", "monitor", "steering", "testing"),
    ("site",),
    ("hf", "vllm", "bench"),
    ("integrations",),
    ("apps",),
    ("facade",),
    ("cli",),
]

#: parts beside the stack: part -> the only parts that may import it
SIDE_PARTS = {"bench": {"cli"}}

#: TEMPORARY (issue 14 part A): import cycles allowed while they stay inside these packages.
#: The ops <-> backends cycle is being removed by part A; then this set must become empty
#: (test_no_stale_cycle_exceptions says so).
PART_A_PENDING_CYCLES: frozenset = frozenset()


# ------------------------------------------------------------------------------ the scan
def _module_names() -> Dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*"):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        rel = path.relative_to(ROOT.parent)
        if path.suffix == ".py":
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
        elif path.suffix in (".so", ".pyd"):  # compiled extensions: steerkernel._C
            parts = list(rel.parent.parts) + [path.name.split(".")[0]]
        else:
            continue
        mods[".".join(parts)] = path
    return mods


MODULES = _module_names()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _known(name: str) -> Optional[str]:
    """``name`` if it is a steerkernel module, else its longest module prefix below the
    package itself (``steerkernel._C`` stays itself when the extension is not built here)."""
    known = name
    while known and known not in MODULES:
        known = known.rpartition(".")[0]
    if known == PACKAGE and name != PACKAGE:
        return name
    return known or None


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _import_module_target(call: ast.Call, module: str) -> Optional[str]:
    """The module an ``importlib.import_module(...)`` call names, when it is a constant."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Add) \
            and isinstance(arg.left, ast.Name) and arg.left.id == "__name__" \
            and isinstance(arg.right, ast.Constant) and isinstance(arg.right.value, str):
        return module + arg.right.value
    return None


def _imports(module: str) -> List[Tuple[str, int]]:
    """``(imported steerkernel module, line)`` for every import written in ``module``."""
    path = MODULES[module]
    if path.suffix != ".py":
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if _is_package(module) else module.rpartition(".")[0]
    found: List[Tuple[str, int]] = []
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:  # a submodule when one of that name exists, else an attribute
                sub = f"{source}.{a.name}"
                targets.append(sub if sub in MODULES else source)
        elif isinstance(node, ast.Call):
            name = _import_module_target(node, module)
            targets = [name] if name else []
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                known = _known(t)
                if known:
                    found.append((known, node.lineno))
    return found


def _graph() -> Dict[str, Dict[str, str]]:
    """module -> {imported module: 'file:line' of the first import that brings it in}."""
    graph: Dict[str, Dict[str, str]] = {}
    for module in sorted(MODULES):
        own = set(_ancestors(module)) | {module}
        edges: Dict[str, str] = {}
        for target, line in _imports(module):
            where = f"{MODULES[module].relative_to(ROOT.parent)}:{line}"
            for t in [target] + [a for a in _ancestors(target) if a not in own]:
                if t != module:
                    edges.setdefault(t, where)
        graph[module] = edges
    return graph


GRAPH = _graph()


def _cycles(graph: Dict[str, Dict[str, str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _cycle_path(comp: List[str]) -> str:
    """One concrete cycle through ``comp``, with the import line of every step."""
    members = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    while True:
        here = path[-1]
        nxt = next(w for w in sorted(GRAPH[here]) if w in members and
                   (w == start or w not in seen) and _reaches(w, start, members))
        path.append(nxt)
        if nxt == start:
            break
        seen.add(nxt)
    return " -> ".join(f"{a} ({GRAPH[a][b]})" for a, b in zip(path, path[1:])) + f" -> {start}"


def _reaches(a: str, b: str, members: Set[str]) -> bool:
    todo, seen = [a], {a}
    while todo:
        v = todo.pop()
        if v == b:
            return True
        for w in GRAPH[v]:
            if w in members and w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def _in_pending(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PART_A_PENDING_CYCLES)


def part_of(module: str) -> Optional[str]:
    if module in MODULE_PARTS:
        return MODULE_PARTS[module]
    best = max((p for p in PARTS if module == p or module.startswith(p + ".")), key=len,
               default=None)
    return PARTS[best] if best else None


def _layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


# ------------------------------------------------------------------------------ the tests
def test_the_scan_sees_lazy_relative_and_dynamic_imports():
    """The scanner itself: imports inside functions, relative ones and import_module calls."""
    # concepts/__init__.py imports .extract inside __getattr__
    assert "steerkernel.concepts.extract" in GRAPH["steerkernel.concepts"]
    # integrations/vllm/__init__.py: importlib.import_module(__name__ + ".frontend")
    assert "steerkernel.integrations.vllm.frontend" in GRAPH["steerkernel.integrations.vllm"]
    # from ...errors import ... (three levels up) in integrations/hf/attach.py
    assert "steerkernel.errors" in GRAPH["steerkernel.integrations.hf.attach"]
    # from ..ops.junction import ... also runs steerkernel/ops/__init__.py
    assert {"steerkernel.ops.junction", "steerkernel.ops"} <= set(
        GRAPH["steerkernel.concepts.extract"])
    assert len(MODULES) > 40 and "steerkernel.cli.main" in MODULES


def test_no_import_cycles():
    cycles = [c for c in _cycles(GRAPH) if not all(_in_pending(m) for m in c)]
    assert not cycles, "import cycles:\n" + "\n".join(_cycle_path(c) for c in cycles)


def test_no_stale_cycle_exceptions():
    """PART_A_PENDING_CYCLES is temporary: once no cycle needs it, it must be emptied."""
    if not PART_A_PENDING_CYCLES:
        return
    pending = [c for c in _cycles(GRAPH) if all(_in_pending(m) for m in c)]
    assert pending, ("no import cycle is left inside PART_A_PENDING_CYCLES "
                     f"{sorted(PART_A_PENDING_CYCLES)}: empty that set in "
                     "tests/test_architecture.py")


def test_the_library_never_imports_the_cli():
    bad = [f"{m} imports {t} ({where})" for m, edges in GRAPH.items()
           if part_of(m) != "cli" for t, where in edges.items()
           if t == "steerkernel.cli" or t.startswith("steerkernel.cli.")]
    assert not bad, "the CLI sits on top; nothing else may import it:\n" + "\n".join(bad)


def test_every_module_has_a_part_and_every_part_a_layer():
    parts = set(PARTS.values()) | set(MODULE_PARTS.values())
    assert parts == {p for layer in LAYERS for p in layer}, "PARTS and LAYERS disagree"
    assert set(SIDE_PARTS) <= parts
    unplaced = sorted(m for m in MODULES if part_of(m) is None)
    assert not unplaced, (f"modules outside every part: {unplaced}; add them to PARTS in "
                          "tests/test_architecture.py and to docs/architecture.md")


@pytest.mark.parametrize("part", sorted(set(PARTS.values()) | set(MODULE_PARTS.values())))
def test_imports_only_point_down(part):
    bad = []
    for module, edges in GRAPH.items():
        if part_of(module) != part:
            continue
        for target, where in edges.items():
            other = part_of(target)
            if other == part:
                continue
            if other is None:
                bad.append(f"{module} -> {target} ({where}): {target} is in no part")
            elif other in SIDE_PARTS and part not in SIDE_PARTS[other]:
                bad.append(f"{module} -> {target} ({where}): {other} is beside the stack; only "
                           f"{sorted(SIDE_PARTS[other])} may import it")
            elif _layer_of(other) >= _layer_of(part):
                how = "the same layer" if _layer_of(other) == _layer_of(part) else "a higher layer"
                bad.append(f"{module} -> {target} ({where}): {other} is in {how} than {part}")
    assert not bad, "imports that do not point down (docs/architecture.md):\n" + "\n".join(bad)
