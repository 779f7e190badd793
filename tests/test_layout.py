"""The package layout stays legible: checked from the source (ast), so it stays true as code is added.

- no import cycle among `src/preflens` modules, function-local (lazy) imports included;
- nothing under `preflens/diagnostics/` or `preflens/grad/` reaches the trainer, the report, the commands
  or the integrations, directly or through other modules (the arrows run one way);
- papers are cited by authors, year and arXiv id: no "seed 000"-style names of files users never had;
- units are small enough to read in one sitting (functions <= 150 lines, classes <= 600, the Trainer <= 450).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "preflens"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str) -> set[str]:
    """Every preflens module `name` imports, at the top or inside a function (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(mod: str) -> None:
        if mod in MODULES:
            found.add(mod)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            resolve(mod)
            for alias in node.names:
                resolve(f"{mod}.{alias.name}")  # `from preflens.x import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _find_cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(GRAPH[u]):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state:
                cycle = dfs(v)
                if cycle:
                    return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(GRAPH):
        if u not in state:
            cycle = dfs(u)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_lazy_imports():
    """The checker itself: a function-local import is an edge (else a lazy cycle would pass unseen)."""
    assert "preflens.training.trainer" in GRAPH["preflens.train"]
    assert any(GRAPH[m] for m in MODULES if m.startswith("preflens.commands."))
    tree = ast.parse("def f():\n    from preflens.train import train\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))


def test_no_import_cycle():
    cycle = _find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


UPPER = ("preflens.train", "preflens.training", "preflens.probes", "preflens.rft", "preflens.report",
         "preflens.commands", "preflens.cli", "preflens.demo", "preflens.compare", "preflens.integrations")  # fmt: skip


def _reachable(start: str) -> dict[str, str]:
    """Modules reachable from `start`, each with the module that imports it (for the error message)."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        u = todo.pop()
        for v in GRAPH[u]:
            if v not in seen:
                seen[v] = u
                todo.append(v)
    return seen


@pytest.mark.parametrize("layer", ["preflens.diagnostics", "preflens.grad"])
def test_diagnostics_and_grad_never_reach_the_trainer(layer):
    members = [m for m in MODULES if m == layer or m.startswith(layer + ".")]
    assert members
    bad = []
    for m in members:
        for v, via in _reachable(m).items():
            if any(v == u or v.startswith(u + ".") for u in UPPER):
                bad.append(f"{m} reaches {v} (imported by {via})")
    assert not bad, "\n".join(bad)


SEED_NAME = re.compile(r"\bseeds?\s+0\d\d?\b|\bseed\s+0\b", re.IGNORECASE)


def test_papers_are_cited_by_name_not_by_seed_file():
    hits = []
    for path in sorted(PKG.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".md", ".txt", ".html", ".j2", ".css"):
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if SEED_NAME.search(line):
                    hits.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not hits, "cite papers by authors, year, arXiv id:\n" + "\n".join(hits)


def _units():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield name, node, node.end_lineno - node.lineno + 1


def test_units_are_small_enough_to_read():
    long = []
    for mod, node, n in _units():
        limit = 600 if isinstance(node, ast.ClassDef) else 150
        if node.name == "Trainer" and mod == "preflens.training.trainer":
            limit = 450
        if n > limit:
            long.append(f"{mod}.{node.name}: {n} lines (limit {limit})")
    assert not long, "\n".join(long)


def test_the_public_names_design_md_fixes_still_import():
    from preflens.diagnostics.ches import ches_score
    from preflens.diagnostics.gram import sequence_gram
    from preflens.losses import LOSSES, PairLogps, get_loss
    from preflens.train import Trainer, TrainerCallback, train

    assert callable(get_loss) and "dpo" in LOSSES and callable(sequence_gram) and callable(ches_score)
    assert PairLogps.__name__ == "PairLogps" and callable(train) and Trainer and TrainerCallback
