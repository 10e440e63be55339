"""Imports point one way: down the layer list in docs/design.md, with no cycle between modules.

Every module's imports are read from its source (those inside functions too: a lazy import is
still a dependency), so a new upward import or cycle fails here before it tangles the code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from repo_root import REPO as REPO_ROOT

SRC = REPO_ROOT / "src"
PACKAGE = SRC / "unmask"


def _layers() -> dict[str, int]:
    """``{top-level name: rank}`` from the indented list under ``## Layers`` in docs/design.md."""
    text = (REPO_ROOT / "docs" / "design.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    ranks: dict[str, int] = {}
    lines = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    for rank, line in enumerate(lines):
        for name in line.split(","):
            ranks[re.sub(r"\s*\(.*\)", "", name).strip()] = rank
    return ranks


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every ``unmask`` import in ``path``."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("unmask")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("unmask"):
                continue
            names = [a.name for a in node.names]
            found.append((target, names, node.lineno))
            # ``from package import submodule`` depends on the submodule too
            found += [
                (f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in modules
            ]
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "unmask"


def test_the_layer_list_names_every_top_level_module():
    ranks = _layers()
    tops = {_top(m) for m in _modules()}
    assert tops <= set(ranks), f"add {sorted(tops - set(ranks))} to '## Layers' in docs/design.md"
    assert set(ranks) <= tops, f"docs/design.md lists {sorted(set(ranks) - tops)}: not in src/"


def test_no_import_points_up_or_takes_a_private_name_across_packages():
    ranks, modules = _layers(), _modules()
    bad = []
    for name, path in sorted(modules.items()):
        for target, names, line in _imports(name, path, modules):
            where = f"{path.relative_to(REPO_ROOT)}:{line}"
            if ranks[_top(target)] > ranks[_top(name)]:
                bad.append(f"{where} imports {target} (layer above)")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _top(target) != _top(name):
                bad.append(f"{where} takes private {private} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {
        name: sorted({t for t, _, _ in _imports(name, path, modules) if t in modules} - {name})
        for name, path in modules.items()
    }
    cycles = _strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path):
    """The reader itself: a lazy import inside a function counts; TYPE_CHECKING does not."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from unmask.train.rl import RLConfig\n"
        "def f():\n    from unmask.cli import main\n    from . import _private\n"
    )
    found = _imports("unmask.models.mod", source, {})
    assert [(t, n) for t, n, _ in found] == [
        ("unmask.cli", ["main"]),
        ("unmask.models", ["_private"]),
    ]


def test_the_design_page_names_every_module():
    """docs/design.md's layout lists each module file, so the page follows the tree."""
    text = (REPO_ROOT / "docs" / "design.md").read_text()
    layout = text.split("\n## Names and layout\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"[\w]+\.py", layout))
    files = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert not files - named, f"add {sorted(files - named)} to docs/design.md's layout"
