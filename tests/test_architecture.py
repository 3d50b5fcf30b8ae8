"""growkit's import graph, built with ``ast`` from the source: no cycles, no private names across modules.

Every import counts, wherever it is written (module level, inside a function, under
``TYPE_CHECKING``): a cycle hidden behind a function-level import is still a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "growkit"


def module_name(path: Path, root: Path = PKG) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> tuple[dict[str, set[str]], list[str]]:
    """``(edges, private)``: module -> growkit modules it imports; and every ``_private`` name one
    module takes from another (``from m import _x`` or ``m._x`` on an imported module)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    packages = {module_name(p, root) for p in root.rglob("__init__.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    private: list[str] = []
    for mod, path in files.items():
        pkg = mod if mod in packages else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> growkit module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == root.name:
                        edges[mod].add(a.name)
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != root.name:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in files:  # "from . import x" imports the module x
                        edges[mod].add(sub)
                        aliases[a.asname or a.name] = sub
                        continue
                    edges[mod].add(target)
                    if a.name.startswith("_") and not a.name.startswith("__") and target != mod:
                        private.append(f"{mod} imports {target}.{a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{mod} uses {aliases[node.value.id]}.{node.attr}")
    for m in edges:
        edges[m] = {t for t in edges[m] if t in files and t != m}
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def package_imports(edges: dict[str, set[str]], packages: set[str]) -> dict[str, set[str]]:
    """The graph without edges into package ``__init__`` modules that only re-export (a submodule
    importing ``growkit.errors`` runs ``growkit/__init__`` first, but does not depend on it)."""
    return {m: {t for t in ts if t not in packages} for m, ts in edges.items()}


def growkit_graph() -> tuple[dict[str, set[str]], list[str]]:
    edges, private = import_graph()
    packages = {module_name(p) for p in PKG.rglob("__init__.py")}
    inner = {m: ts for m, ts in package_imports(edges, packages).items() if m not in packages}
    return inner, private


def test_growkit_has_no_import_cycle() -> None:
    edges, _ = growkit_graph()
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges) or [])}"


def test_no_private_name_crosses_modules() -> None:
    _, private = growkit_graph()
    assert not private, "private names imported across modules (make them public in their module):\n" + "\n".join(private)


def test_core_does_not_import_the_wings() -> None:
    """Data flows one way: the core pipeline never reaches up into growth, search or lifelong."""
    edges, _ = growkit_graph()
    up = sorted(f"{m} -> {t}" for m, ts in edges.items() if m.startswith("growkit.core.")
                for t in ts if t.startswith(("growkit.growth", "growkit.search", "growkit.lifelong", "growkit.adapters")))
    assert not up, "core imports a wing: " + ", ".join(up)


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "growkit"
    for name, text in files.items():
        p = pkg / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


@pytest.mark.parametrize("files, cycle", [
    # a function-level import closes the circle: still a cycle
    ({"__init__.py": "", "a.py": "from .b import f\n", "b.py": "def f():\n    from .a import g\n"}, True),
    # a TYPE_CHECKING import counts too
    ({"__init__.py": "", "a.py": "from .b import f\n",
      "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"}, True),
    ({"__init__.py": "", "sub/__init__.py": "", "sub/a.py": "from ..b import f\n", "b.py": "import growkit.sub.c\n",
      "sub/c.py": "from .a import x\n"}, True),
    ({"__init__.py": "from .a import f\n", "a.py": "from .b import f\n", "b.py": "x = 1\n"}, False),
])
def test_checker_finds_cycles(tmp_path: Path, files: dict[str, str], cycle: bool) -> None:
    pkg = _write(tmp_path, files)
    edges, _ = import_graph(pkg)
    packages = {module_name(p, pkg) for p in pkg.rglob("__init__.py")}
    assert (find_cycle(package_imports(edges, packages)) is not None) is cycle


def test_checker_finds_private_imports(tmp_path: Path) -> None:
    pkg = _write(tmp_path, {"__init__.py": "", "a.py": "def _h():\n    pass\n_T = 1\n",
                            "b.py": "from .a import _h\n", "c.py": "from . import a\nx = a._T\n",
                            "d.py": "from .a import __doc__\n"})
    _, private = import_graph(pkg)
    assert sorted(private) == ["growkit.b imports growkit.a._h", "growkit.c uses growkit.a._T"]


def test_import_growkit_loads_no_search_pass() -> None:
    """Search passes register lazily: ``import growkit`` (a fresh interpreter) imports none of them."""
    import subprocess
    import sys

    code = ("import sys, growkit; print(sorted(m for m in sys.modules if m.startswith('growkit.search')));"
            "growkit.grow; from growkit.growth.methods import get_method; get_method('darts');"
            "print('growkit.search.darts' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True", out


def test_grow_settings_are_one_typed_config() -> None:
    """grow()'s settings and GrowConfig's fields agree (names and defaults), and no module reads a
    settings dict by key (``cfg["..."]``)."""
    import dataclasses
    import inspect

    from growkit.growth.config import GrowConfig
    from growkit.growth.grow import grow

    params = inspect.signature(grow).parameters
    for f in dataclasses.fields(GrowConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        assert f.name in params, f"GrowConfig.{f.name} is not a grow() argument"
        want = params[f.name].default
        assert (want if want is not None else None) == default or (want is None and default == {}), (f.name, want, default)
    by_key = []
    for path in PKG.rglob("*.py"):
        # (timm's pretrained_cfg dicts, read in core/graph.py and modelspec.py, are not grow settings)
        wing = path.parent.name in ("growth", "search", "lifelong") or path.name == "prune.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                    and isinstance(node.slice.value, str)
                    and (getattr(node.value, "attr", None) == "cfg" or (wing and getattr(node.value, "id", None) == "cfg"))):
                by_key.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not by_key, "settings read by key: " + ", ".join(by_key)
