"""The layout tells the job's path: the README's tree lists exactly the package's modules, the package does not
import the top-level ``schemas.py``, and no test reaches for a private name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = PROJECT_ROOT / "sdxl_worker"


def readme_tree_modules() -> set[str]:
    """``folder/module.py`` paths (relative to the package) named in the README's architecture tree."""
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    tree = section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]
    named, folders = set(), {}
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        entry = line.strip().split("  ")[0]
        folders = {level: name for level, name in folders.items() if level < depth}
        if entry.endswith("/"):
            folders[depth] = entry
            continue
        prefix = "".join(name for level, name in sorted(folders.items()) if name != "sdxl_worker/")
        if "sdxl_worker/" not in folders.values():
            continue
        named.update(prefix + name for name in re.findall(r"[a-z_]+\.py", entry))
    return named


def test_the_readme_tree_lists_exactly_the_package_modules():
    modules = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert readme_tree_modules() == modules


def test_the_package_does_not_import_the_top_level_schemas_module():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "schemas" or "schemas" in names:
                importers.append(str(path.relative_to(PROJECT_ROOT)))
    assert importers == []


def test_no_test_imports_a_private_name():
    private = []
    for path in (PROJECT_ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("sdxl_worker", "handler", "bench")):
                private += [f"{path.name}: {node.module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_")]
    assert private == []
