"""The package's import graph: no import cycle among moa_jax's modules, counting imports inside functions and
`if __name__ == "__main__":` blocks (they run too, just later), and no module imports from a layer above its own
(the layer order in README.md "Layout")."""
from __future__ import annotations

import ast
import os
import textwrap

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moa_jax")


def package_modules(package_dir: str) -> dict[str, str]:
    """Every module under package_dir -> its file ("pkg.sub" for pkg/sub/__init__.py)."""
    root = os.path.dirname(package_dir)
    out = {}
    for dirpath, _, files in os.walk(package_dir):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def imported_modules(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level, functions, classes, __main__ blocks)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import: climb level-1 packages up from this module's package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]   # `from pkg import module`
        else:
            continue
        for c in candidates:
            while c and c not in modules:   # `from pkg.mod import func` depends on pkg.mod
                c = c.rpartition(".")[0]
            if c and c != name and not name.startswith(c + "."):   # a package's own parents are not edges
                found.add(c)
    return found


def import_cycles(package_dir: str) -> list[list[str]]:
    """Each strongly connected group of modules that import each other (Tarjan), as one cycle through them."""
    modules = package_modules(package_dir)
    graph = {n: imported_modules(n, p, modules) for n, p in modules.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(u):
        index[u] = low[u] = len(index)
        stack.append(u)
        on_stack.add(u)
        for v in sorted(graph[u]):
            if v not in index:
                visit(v)
                low[u] = min(low[u], low[v])
            elif v in on_stack:
                low[u] = min(low[u], index[v])
        if low[u] == index[u]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == u:
                    break
            if len(group) > 1:
                groups.append(_cycle_through(sorted(group), graph))

    for n in sorted(graph):
        if n not in index:
            visit(n)
    return groups


def _cycle_through(group: list[str], graph: dict) -> list[str]:
    """One concrete cycle inside a strongly connected group, for the failure message (a -> b -> a)."""
    members, path, start = set(group), [group[0]], group[0]
    seen = {start}
    while True:
        nxt = sorted(v for v in graph[path[-1]] if v in members)
        back = [v for v in nxt if v == start]
        if back:
            return path + [start]
        fresh = [v for v in nxt if v not in seen]
        if not fresh:   # dead end inside the group: the group is listed whole instead
            return group + [group[0]]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_moa_jax_has_no_import_cycle():
    cycles = import_cycles(PACKAGE_DIR)
    assert not cycles, "import cycles (move the shared code down a layer):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


# Lowest first; a module belongs to the first layer with a prefix that names it or a package above it.
LAYERS = [
    ("config", "data_config", "errors", "overrides", "distributed", "routing", "methods", "variants"),
    ("nn", "params", "sharding", "grow", "flops"),
    ("loading", "data", "peft_import"),
    ("train", "generate", "run_artifacts"),
    ("eval",),
    ("workflows",),
    ("api", "export", "export_router", "reference_router"),
    ("cli",),
]


def layer_of(module: str) -> int:
    """moa_jax.<name>... -> its layer index; `python -m` entry points (__main__) belong to the command lines."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return len(LAYERS) - 1
    for i, names in enumerate(LAYERS):
        if len(parts) > 1 and parts[1] in names:
            return i
    raise AssertionError(f"{module}: in no layer; add it to LAYERS in tests/test_architecture.py and README Layout")


def upward_imports(package_dir: str) -> list[str]:
    """Every import edge "a -> b" with b in a higher layer than a (the package's own __init__ is the top)."""
    modules = package_modules(package_dir)
    return [f"{m} -> {d}" for m, p in sorted(modules.items()) if "." in m
            for d in sorted(imported_modules(m, p, modules)) if "." in d and layer_of(d) > layer_of(m)]


def test_no_module_imports_from_a_higher_layer():
    upward = upward_imports(PACKAGE_DIR)
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_layer_check_sees_an_upward_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "from moa_jax.api import load_model\n",
        "config.py": "",
        "api.py": "from moa_jax.nn.model import M\n",                         # down: fine
        "nn/__init__.py": "",
        "nn/model.py": "def f():\n    from moa_jax.train import loop\n",    # up, inside a function
        "train/__init__.py": "",
        "train/loop.py": "from moa_jax import config\n",
        "generate/__main__.py": "from moa_jax.cli.generate import main\n",   # entry point: top layer
        "cli/generate.py": "",
    }, name="moa_jax")
    assert upward_imports(pkg) == ["moa_jax.nn.model -> moa_jax.train", "moa_jax.nn.model -> moa_jax.train.loop"]


def _write_package(tmp_path, files: dict[str, str], name: str = "pkg") -> str:
    for rel, text in files.items():
        path = tmp_path / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path / name)


def test_checker_finds_a_cycle_hidden_in_a_function_and_a_main_block(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from pkg.high import g\n",            # back-edge inside a function
        "high.py": "from pkg import low\n",
        "sub/__init__.py": "",
        "sub/a.py": "from .b import x\n",                                  # relative import
        "sub/b.py": 'if __name__ == "__main__":\n    import pkg.sub.a\n',
        "clean.py": "import os\nfrom pkg.low import f\n",
    })
    cycles = sorted(import_cycles(pkg))
    assert cycles == [["pkg.high", "pkg.low", "pkg.high"], ["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"]]


def test_checker_accepts_a_layered_package(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "from pkg.top import run\n",
        "base.py": "X = 1\n",
        "mid/__init__.py": "",
        "mid/m.py": "from pkg.base import X\nfrom .. import base\n",
        "top.py": "def run():\n    from pkg.mid import m\n    return m\n",
    })
    assert import_cycles(pkg) == []
