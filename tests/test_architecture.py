"""The package's import graph: no import cycle among moa_jax's modules, counting imports inside functions and
`if __name__ == "__main__":` blocks (they run too, just later), and no module imports from a layer above its own
(the layer order in docs/layout.md)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
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
    ("config", "config_fields", "data_config", "model_config", "errors", "overrides", "distributed", "routing",
     "methods", "variants", "names", "run_lock"),
    ("nn", "params", "sharding", "grow", "flops"),
    ("loading", "data", "peft_import"),
    ("train", "generate", "run_artifacts", "pretrained"),
    ("eval",),
    ("workflows",),
    ("api", "export", "export_router", "reference_router", "route_serve"),
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
    raise AssertionError(f"{module}: in no layer; add it to LAYERS in tests/test_architecture.py and docs/layout.md")


def upward_imports(package_dir: str) -> list[str]:
    """Every import edge "a -> b" with b in a higher layer than a. The package's face (its __init__) counts as the
    top layer: it may hand on any name, but nothing inside the package may import it."""
    modules = package_modules(package_dir)
    top = os.path.basename(package_dir)

    def layer(module: str) -> int:
        return len(LAYERS) if module == top else layer_of(module)
    return [f"{m} -> {d}" for m, p in sorted(modules.items())
            for d in sorted(imported_modules(m, p, modules)) if layer(d) > layer(m)]


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


# ---- the repository's three top-level packages together: moa_jax < experiments < benchmarks ----
REPO = os.path.dirname(PACKAGE_DIR)
TOP_PACKAGES = ("moa_jax", "experiments", "benchmarks")
# The `moa-jax` console script dispatches to every command line, `python -m experiments.run` included: it ranks
# above experiments (and below benchmarks, which it does not run), so nothing in moa_jax or experiments imports it.
ENTRY_POINTS = {"moa_jax.cli.main": 1.5}


def repo_modules() -> dict[str, str]:
    out = {}
    for top in TOP_PACKAGES:
        out.update(package_modules(os.path.join(REPO, top)))
    return out


def test_top_level_packages_have_no_cycle_and_no_upward_import():
    """One import graph over moa_jax, experiments and benchmarks (package faces included): no cycle anywhere, the
    library imports neither top-level package (but for the console script, ENTRY_POINTS), and experiments/ does
    not import benchmarks/."""
    modules = repo_modules()
    graph = {n: imported_modules(n, p, modules) for n, p in modules.items()}
    assert set(ENTRY_POINTS) <= set(graph), sorted(set(ENTRY_POINTS) - set(graph))

    def rank(module: str) -> float:
        return ENTRY_POINTS.get(module, TOP_PACKAGES.index(module.split(".")[0]))
    upward = [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps) if rank(d) > rank(m)]
    assert not upward, "imports from a higher top-level package:\n" + "\n".join(upward)
    assert not _cycles(graph), _cycles(graph)
    # and no loop between sub-packages (moa_jax.generate -> moa_jax.cli -> moa_jax.api -> moa_jax.generate)
    packages: dict[str, set] = {}
    for m, deps in graph.items():
        packages.setdefault(_package(m), set()).update(_package(d) for d in deps if _package(d) != _package(m))
    assert not _cycles(packages), _cycles(packages)


def _package(module: str) -> str:
    """moa_jax.generate.decode -> moa_jax.generate; moa_jax.config -> moa_jax.config."""
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict) -> list:
    """Strongly connected groups of more than one module (an iterative check, no recursion limit)."""
    seen, cycles = set(), []
    for start in sorted(graph):
        reach = _reachable(graph, start)
        if start in reach and start not in seen:
            group = sorted(v for v in reach if start in _reachable(graph, v))
            seen.update(group)
            cycles.append(group)
    return cycles


def _reachable(graph: dict, start: str) -> set:
    reach, todo = set(), [start]
    while todo:
        for v in graph[todo.pop()]:
            if v not in reach:
                reach.add(v)
                todo.append(v)
    return reach


def test_the_package_face_and_leaf_modules_import_no_jax():
    """`import moa_jax`, its ground-floor modules and the console script stay light: no jax, no model code until a
    name is used (or a subcommand runs)."""
    code = ("import sys, moa_jax, moa_jax.routing, moa_jax.config, moa_jax.workflows, experiments.registry\n"
            "import moa_jax.cli.main   # the console script, until a subcommand runs\n"
            "heavy = [m for m in ('jax', 'flax', 'moa_jax.api', 'moa_jax.nn') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert moa_jax.MoAConfig.__name__ == 'MoAConfig'   # a lazy name resolves on use\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
