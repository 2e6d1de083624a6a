"""The shape of the code: no import cycles among multilane's modules, and no private names imported across them.

Every `import` counts wherever it is written: at the top, inside a function, and under `if TYPE_CHECKING:`.
A type-only import is still a dependency of one module's design on another's, and hiding a loop behind one
(or behind an import inside a function) is how the spec <-> agents loop lived unnoticed. Importing a
submodule is counted as depending on that submodule only, not on the packages above it.
"""

from __future__ import annotations

import ast
import graphlib
import itertools
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "multilane"


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    names: tuple[str, ...]
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """The multilane modules one file imports, and the names it takes from each."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = nearest_module(alias.name, known)
                if target is not None:
                    found.append(Import(name, target, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            plain: list[str] = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from multilane.server import ollama_api`: a submodule
                    found.append(Import(name, f"{base}.{alias.name}", (), node.lineno))
                else:
                    plain.append(alias.name)
            target = nearest_module(base, known)
            if plain and target is not None:
                found.append(Import(name, target, tuple(plain), node.lineno))
    return found


def nearest_module(dotted: str, known: set[str]) -> str | None:
    parts = dotted.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def all_imports() -> list[Import]:
    modules = all_modules()
    known = set(modules)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, known)]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_source_tree_is_found() -> None:
    modules = all_modules()
    assert {"multilane", "multilane.runtime", "multilane.agents", "multilane.pipeline.executor"} <= set(modules)
    assert any(imp.target == "multilane.errors" for imp in all_imports())


def test_no_import_cycles_among_multilane_modules() -> None:
    graph: dict[str, set[str]] = {name: set() for name in all_modules()}
    where: dict[tuple[str, str], int] = {}
    for imp in all_imports():
        if imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
            where.setdefault((imp.importer, imp.target), imp.line)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle: list[str] = list(reversed(exc.args[1]))  # graphlib lists a dependency before its dependent
        steps = [f"{a} (line {where[(a, b)]}) imports {b}" for a, b in itertools.pairwise(cycle)]
        raise AssertionError("import cycle: " + "; ".join(steps)) from None


def test_no_private_names_are_imported_across_modules() -> None:
    offences = [f"{imp.importer} line {imp.line} imports {name} from {imp.target}"
                for imp in all_imports() for name in imp.names if is_private(name) and imp.target != imp.importer]
    assert offences == []


def test_the_checks_see_cycles_and_private_names(tmp_path: Path) -> None:
    """The checks themselves work: a function-level import closing a loop, and a private name, are both seen."""
    known = {"multilane.a", "multilane.b"}
    (tmp_path / "a.py").write_text("from multilane.b import _helper\n")
    (tmp_path / "b.py").write_text("def f():\n    from multilane import a\n")
    (tmp_path / "__init__.py").write_text("")
    a = imports_of("multilane.a", tmp_path / "a.py", known | {"multilane"})
    b = imports_of("multilane.b", tmp_path / "b.py", known | {"multilane"})
    assert [(i.target, i.names) for i in a] == [("multilane.b", ("_helper",))]
    assert [(i.target, i.names) for i in b] == [("multilane.a", ())]
    assert is_private("_helper") and not is_private("__version__")
