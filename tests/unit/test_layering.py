"""The layering of the README's map, read from the code's own imports: no cycles between components, no
import that breaks a rule (issue 21 point 6).

Every module under ``platform/aifactory/`` is parsed with ``ast``; its imports are collected wherever they
are written (module level and inside functions: a function-level import that closes a cycle is still a
cycle), including relative imports and ``importlib.import_module("...")`` / ``__import__("...")`` strings.
A component is the first folder under ``platform/aifactory/``; the top-level modules (``exceptions.py``,
``tenancy.py``, ``config.py``, ``home.py``, ...) are the base layer; ``aifactory/__init__.py`` is the
package's facade (the SDK's lazy exports), which sits on top of everything.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "aifactory"
BASE = "(base)"
FACADE = "(facade)"
RECIPE_FOLDERS = ("jobs", "benchmarks", "serve_apps")

# (importing component or "*", imported module prefix, why): the README map's rules.
RULES = [
    ("*", "jobs", "the library never imports recipes"),
    ("*", "benchmarks", "the library never imports recipes"),
    ("*", "serve_apps", "the library never imports recipes"),
    ("*", "aifactory.cli", "only the CLI knows the CLI"),
    ("*", "aifactory.pipeline", "components do not know the factory run pipeline"),
    ("serve", "aifactory.optimize", "serving builds models through models/"),
    ("registry", "aifactory.train", "the registry knows neither training nor serving"),
    ("registry", "aifactory.serve", "the registry knows neither training nor serving"),
    ("train", "aifactory.cost.ledger", "training does not write the ledger itself"),
]
# Who may import what the rules above forbid to others: the CLI sits on top, the pipeline is itself.
EXEMPT = {"cli": {"aifactory.cli", "aifactory.pipeline"}, "pipeline": {"aifactory.pipeline"}, FACADE: {"aifactory.pipeline"}}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    path: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line} imports {self.module}"


def module_name(path: Path, pkg_root: Path) -> str:
    parts = list(path.relative_to(pkg_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component_of_file(path: Path, pkg_root: Path) -> str:
    rel = path.relative_to(pkg_root).parts
    if len(rel) == 1:
        return FACADE if rel[0] == "__init__.py" else BASE
    return rel[0]


def component_of_module(module: str, pkg_root: Path) -> str | None:
    """The component an absolute module name belongs to; None outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return FACADE
    return parts[1] if (pkg_root / parts[1]).is_dir() else BASE


def imports_of(path: Path, pkg_root: Path) -> list[Import]:
    """Every import ``path`` makes, wherever it is written, as absolute module names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, pkg_root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(a.name, path, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # ``from aifactory import tenancy``: the submodule is what is imported
                sub = f"{module}.{alias.name}"
                is_sub = (pkg_root.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (pkg_root.parent / Path(*sub.split("."))).is_dir()
                found.append(Import(sub if is_sub else module, path, node.lineno))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "__import__"):
                found += [Import(a.value, path, node.lineno) for a in node.args[:1]
                          if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return sorted(set(found), key=lambda i: (i.line, i.module))  # one per (module, line)


def broken_rules(pkg_root: Path) -> list[str]:
    root = pkg_root.parents[1]
    broken = []
    for path in sorted(pkg_root.rglob("*.py")):
        comp = component_of_file(path, pkg_root)
        src = path.read_text()
        rel = path.relative_to(root)
        if comp != "cli":
            if re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=", src):
                broken.append(f"{rel}: edits sys.path (the library never reaches recipes by path surgery)")
            if re.search(r"parents\[\d+\]", src) and re.search(r"[\"'](%s)[\"'/]" % "|".join(RECIPE_FOLDERS), src):
                broken.append(f"{rel}: reaches into the checkout's recipe folders by path")
            for node in ast.walk(ast.parse(src)):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and re.fullmatch(r"(%s)\.[a-z_.]+" % "|".join(RECIPE_FOLDERS), node.value)):
                    broken.append(f"{rel}:{node.lineno}: names the recipe module {node.value!r}")
        for imp in imports_of(path, pkg_root):
            for frm, to, why in RULES:
                if to in EXEMPT.get(comp, set()) or comp == to.removeprefix("aifactory."):
                    continue
                if (frm == "*" or frm == comp) and (imp.module == to or imp.module.startswith(to + ".")):
                    broken.append(f"{imp.where(root)} ({why})")
    return broken


def component_graph(pkg_root: Path) -> dict[str, dict[str, list[Import]]]:
    """component -> imported component -> the imports that make the edge (self-edges left out)."""
    graph: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(pkg_root.rglob("*.py")):
        src = component_of_file(path, pkg_root)
        graph[src]  # every component is a node, even one importing nothing
        for imp in imports_of(path, pkg_root):
            dst = component_of_module(imp.module, pkg_root)
            if dst is not None and dst != src:
                graph[src][dst].append(imp)
    return graph


def find_cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one node (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(scc), scc[0]) for scc in sccs]


def _closed_path(graph, members: set[str], start: str) -> list[str]:
    """A shortest cycle through ``start`` inside ``members`` (breadth-first), as ``[start, ..., start]``."""
    prev: dict[str, str] = {}
    queue, seen = deque([start]), {start}
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w in members and w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in a strongly connected component without a cycle through it")


def describe(cycle: list[str], graph, root: Path) -> str:
    """The cycle's path, then up to three imports that make each of its edges."""
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines += [f"    {a} -> {b}: {imp.where(root)}" for imp in graph[a][b][:3]]
    return "\n".join(lines)


PKG = REPO / "platform" / PACKAGE


def test_no_import_cycle_between_components():
    graph = component_graph(PKG)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between components:\n" + "\n".join(describe(c, graph, REPO) for c in cycles)


def test_no_import_breaks_the_maps_rules():
    broken = broken_rules(PKG)
    assert not broken, f"{len(broken)} layering rule(s) broken:\n" + "\n".join(broken)


# ---- the reader itself, on a small package written here: each kind of import is seen ----------------------

def _pkg(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / "platform" / PACKAGE / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path / "platform" / PACKAGE


@pytest.mark.parametrize("how", [
    "from aifactory.b.x import f",
    "def g():\n    from aifactory.b import x",
    "def g():\n    import importlib\n    return importlib.import_module('aifactory.b.x')",
    "from ..b import x",
])
def test_a_cycle_is_found_however_the_import_is_written_and_its_path_printed(tmp_path, how):
    pkg = _pkg(tmp_path, {"__init__.py": "", "tenancy.py": "", "a/__init__.py": "", "a/y.py": how + "\n",
                          "b/__init__.py": "", "b/x.py": "from aifactory.a import y\nfrom aifactory import tenancy\n"})
    graph = component_graph(pkg)
    cycles = find_cycles(graph)
    assert cycles == [["a", "b", "a"]]
    text = describe(cycles[0], graph, tmp_path)
    assert "a -> b -> a" in text and "platform/aifactory/b/x.py:1 imports aifactory.a.y" in text
    assert BASE in graph["b"] and not find_cycles({k: v for k, v in graph.items() if k != "a"})


def test_the_base_layer_importing_a_component_is_a_cycle(tmp_path):
    pkg = _pkg(tmp_path, {"__init__.py": "", "tenancy.py": "def f():\n    from aifactory.a import y\n",
                          "a/__init__.py": "", "a/y.py": "from aifactory.tenancy import f\n"})
    assert find_cycles(component_graph(pkg)) == [[BASE, "a", BASE]]


def test_each_rule_is_checked(tmp_path):
    pkg = _pkg(tmp_path, {
        "__init__.py": "",
        "serve/__init__.py": "", "serve/e.py": "def f():\n    from aifactory.optimize.quantize import build_model\n",
        "optimize/__init__.py": "", "optimize/quantize.py": "",
        "train/__init__.py": "",
        "train/j.py": "import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).parents[3]))\n"
                      "R = 'jobs.recipes'\nP = Path(__file__).parents[3] / 'jobs'\nimport aifactory.pipeline.runner\n",
        "registry/__init__.py": "", "registry/s.py": "from aifactory.serve import e\n",
        "cli/__init__.py": "", "cli/run.py": "from aifactory.pipeline import runner\n",
        "pipeline/__init__.py": "", "pipeline/runner.py": "from aifactory.cli import run\n",
    })
    text = "\n".join(broken_rules(pkg))
    for expected in ("serve/e.py:2 imports aifactory.optimize.quantize", "train/j.py: edits sys.path",
                     "train/j.py:4: names the recipe module 'jobs.recipes'", "train/j.py: reaches into the checkout's",
                     "train/j.py:6 imports aifactory.pipeline.runner", "registry/s.py:1 imports aifactory.serve.e",
                     "pipeline/runner.py:1 imports aifactory.cli.run"):
        assert expected in text, (expected, text)
    assert "cli/run.py" not in text  # the CLI runs the pipeline
