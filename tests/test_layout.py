"""The import graph of the project's own packages has no cycle (issue 22 item 4).

Every import in every .py file under the packages counts as an edge, at module level or inside a function:
``import a.b`` is an edge to the module a.b; ``from a import b`` to the module a.b when there is one, else to a;
relative imports are resolved against the importing file's package. Only imports written in the source count
(a submodule does not depend on its parent package's __init__ implicitly), and only edges between modules of
the listed packages are kept.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

ROOT = Path(__file__).resolve().parent.parent

# The packages whose modules must import each other without a cycle, as one graph (a cycle may cross packages).
PACKAGES = ["mplug_kernels", "bench", "mplug"]
# Compiled extension modules (setup.py builds them): modules without a .py file, so `from mplug_kernels import _C`
# is an edge to them, not to mplug_kernels; they import nothing of ours.
EXTENSION_MODULES = ["mplug_kernels._C"]


def module_files(root: Path, packages: Sequence[str], extensions: Sequence[str] = ()) -> Dict[str, Optional[Path]]:
    """Dotted module name -> .py file of every module under root/<package> (a package is its __init__.py); None
    for the compiled extension modules named in extensions."""
    modules: Dict[str, Optional[Path]] = dict.fromkeys(extensions)
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _known_prefix(name: str, modules: Dict[str, Optional[Path]]) -> Optional[str]:
    """The longest dotted prefix of name (name itself first) that is one of modules, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module named by `from <node.module> import ...` written in `module` (relative or not)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, module: str, modules: Dict[str, Optional[Path]]) -> Set[str]:
    """The modules of `modules` that `module` (the file at path) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known_prefix(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else _known_prefix(base, modules))
    found.discard(None)
    found.discard(module)
    return found


def import_graph(root: Path, packages: Sequence[str], extensions: Sequence[str] = ()) -> Dict[str, Set[str]]:
    """module -> the modules it imports, over every module of the packages under root and the extensions."""
    modules = module_files(root, packages, extensions)
    return {module: imported_modules(path, module, modules) if path else set() for module, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as [a, b, ..., a], or None when the graph has none (iterative depth-first search)."""
    done: Set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        pending = [iter(sorted(graph[start]))]
        while pending:
            target = next(pending[-1], None)
            if target is None:
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                pending.pop()
                continue
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done:
                path.append(target)
                on_path.add(target)
                pending.append(iter(sorted(graph.get(target, ()))))
    return None


def test_project_imports_have_no_cycle():
    graph = import_graph(ROOT, PACKAGES, EXTENSION_MODULES)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_sees_module_level_lazy_and_package_imports():
    """Guards the test above against a parser that finds nothing: edges known to exist are in the graph."""
    graph = import_graph(ROOT, PACKAGES, EXTENSION_MODULES)
    assert "mplug_kernels.backends" in graph["mplug_kernels.ops.attention"]  # module level, a package
    assert "mplug_kernels.ops.triton_launch" in graph["mplug_kernels.backends.triton"]  # inside a method
    assert "mplug_kernels.nn" in graph["mplug_kernels"]  # from a package import a submodule
    assert "bench.report" in graph["bench.bench_fusion_layers"]
    assert graph["mplug_kernels.backends.cuda"] >= {"mplug_kernels._C", "mplug_kernels.backends.base"}


def _write(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_planted_cycle_through_a_lazy_relative_import_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from . import a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "def g():\n    from ..c import h\n",
        "pkg/c.py": "import os\n\ndef h():\n    return os\n",
    })
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.sub.d"] == {"pkg.c"}
    assert graph["pkg.sub.d"] == {"pkg.c"} and graph["pkg"] == set() and graph["pkg.sub"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    (tmp_path / "pkg/b.py").write_text("def f():\n    from .sub import d\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None
    (tmp_path / "pkg/c.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) == ["pkg.a", "pkg.b", "pkg.sub.d", "pkg.c", "pkg.a"]
