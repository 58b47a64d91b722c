"""The package layers: no module imports from a layer above its own (read from the source with ast).

    cli  ->  ui, serve  ->  evaluation, bench, train  ->  app  ->  agents  ->  engine  ->  model  ->  kernels

An arrow means "may import from". A package may import from its own package and from any layer
below; packages that share a layer (evaluation, bench, train) do not import each other. The leaves
(sandbox, answers, prompts, stops, errors, terminal and the `duet` package's own __init__) may be imported from
anywhere and import nothing from duet but `duet.errors`. A `__main__.py` is an entry point, like cli.
Imports inside functions count the same as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DUET = Path(__file__).resolve().parents[1] / "duet"

LAYERS: list[tuple[str, ...]] = [  # lowest first
    ("kernels",),
    ("model",),
    ("engine",),
    ("agents",),
    ("app",),
    ("evaluation", "bench", "train"),
    ("ui", "serve"),
    ("cli",),
]
LEAVES = ("sandbox", "answers", "prompts", "stops", "errors", "terminal", "")  # "" is duet/__init__.py itself
LEAF_MAY_IMPORT = ("errors",)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
ENTRY_RANK = len(LAYERS)


def _unit(module: str) -> str:
    """The first component after `duet.`: the package (or top-level module) a dotted name lives in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(DUET.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every duet import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "duet"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "duet":
                continue
            if module == "duet":  # `from duet import x`: x may be a package or a name in duet/__init__.py
                for alias in node.names:
                    is_unit = (DUET / alias.name).is_dir() or (DUET / f"{alias.name}.py").exists()
                    found.append((node.lineno, f"duet.{alias.name}" if is_unit else "duet"))
            else:
                found.append((node.lineno, module))
    return found


def _violation(importer: str, path: Path, imported: str) -> str | None:
    src, dst = _unit(importer), _unit(imported)
    if src == dst:
        return None
    if src in LEAVES:
        return None if dst in LEAF_MAY_IMPORT else f"the leaf {src or 'duet'} imports {imported}"
    if dst in LEAVES:
        return None
    src_rank = ENTRY_RANK if path.name == "__main__.py" else RANK[src]
    if dst not in RANK:
        return f"{imported} is in no layer (add it to LAYERS or LEAVES in this test)"
    if RANK[dst] > src_rank:
        return f"{importer} imports {imported}, a layer above it"
    if RANK[dst] == src_rank and path.name != "__main__.py":
        return f"{importer} imports {imported}, which shares its layer"
    return None


def test_every_package_is_placed() -> None:
    units = {p.stem if p.is_file() else p.name for p in DUET.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__main__.py")}
    units = {"" if u == "__init__" else u for u in units}
    unplaced = units - set(RANK) - set(LEAVES)
    assert not unplaced, f"place these in LAYERS or LEAVES: {sorted(unplaced)}"


@pytest.mark.parametrize("path", sorted(DUET.rglob("*.py")), ids=lambda p: str(p.relative_to(DUET.parent)))
def test_no_import_from_a_layer_above(path: Path) -> None:
    importer = _module_name(path)
    problems = [f"line {line}: {why}" for line, imported in _imports(path)
                if (why := _violation(importer, path, imported))]
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    assert _violation("duet.agents.critic", DUET / "agents" / "critic.py", "duet.ui.render")
    assert _violation("duet.sandbox.session", DUET / "sandbox" / "session.py", "duet.agents.backends")
    assert _violation("duet.evaluation.runner", DUET / "evaluation" / "runner.py", "duet.bench")
    assert _violation("duet.engine.engine", DUET / "engine" / "engine.py", "duet.model") is None
    assert _violation("duet.answers.parsing", DUET / "answers" / "parsing.py", "duet.errors") is None
