"""The package's layering (../shared/guide/architecture.md): data flows up from the leaves
to sources, features, the table, phases, scoring and export, with the suite, the demo
pipeline and the CLI on top. No module imports from a layer above its own, at module
level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "polymap"

# lowest first; a module may import from its own layer and the ones below
LAYERS = (
    # leaves: one rule each, imported by many
    ("polymap.errors", "polymap.atomic", "polymap.robust", "polymap.device", "polymap.paths",
     "polymap.corpus", "polymap.roles", "polymap.synthetic", "polymap.__version__"),
    ("polymap.checkpoints",),
    ("polymap.features", "polymap.plugins", "polymap.executors"),
    ("polymap.table",),
    ("polymap.extraction", "polymap.evals"),
    ("polymap.phases",),
    ("polymap.scoring",),
    ("polymap.export",),
    ("polymap.suite", "polymap.pipeline", "polymap.cli", "polymap.__main__", "polymap"),
)  # fmt: skip


def layer_of(module: str) -> int:
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            inside = module == name or module.startswith(name + ".")
            if inside and (best is None or len(name) > best[1]):
                best = (index, len(name))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def imports(path: Path) -> list[tuple[str, int]]:
    """Every polymap module ``path`` imports, with the line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "polymap":  # from polymap import X -> polymap.X
                found += [(f"polymap.{a.name}", node.lineno) for a in node.names]
            elif node.module.startswith("polymap."):
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("polymap")]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for target, line in imports(path):
            if layer_of(target) > layer_of(me):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {me} -> {target}")
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    # the rule itself: a phases module importing scoring would be reported
    assert layer_of("polymap.scoring.labels") > layer_of("polymap.phases.model")
    assert layer_of("polymap.suite.train") > layer_of("polymap.features.probe")
    assert layer_of("polymap.corpus") < layer_of("polymap.features.probe")
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from polymap.scoring import RiskScorer\n")
    assert imports(bad) == [("polymap.scoring", 2)]


def test_readme_layout_names_every_module_and_nothing_else():
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("Layout, bottom to top", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"\b([a-z_0-9]+\.py|[a-z_]+/)(?=\s)", block)) - {"polymap/"}
    modules = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py", "__main__.py"}
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    inside = {p.name for p in PACKAGE.glob("*/*.py")}
    assert modules | packages <= named, f"not in the README layout: {modules | packages - named}"
    assert named <= modules | packages | inside, (
        f"not in the tree: {named - modules - packages - inside}"
    )
