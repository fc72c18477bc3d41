"""The docs name tests that exist: every ``tests/<file>.py`` and ``::<test>`` they cite is there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `tests/test_x.py::test_a[param]`, `::test_b` (a name alone refers to the last file named before it).
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+)(?:\[[^\]`]*\])?)?`|`::(\w+)(?:\[[^\]`]*\])?`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_the_docs_cite_exists() -> None:
    missing: list[str] = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        current: Path | None = None
        for line in doc.read_text().splitlines():
            for match in REFERENCE.finditer(line):
                file, named, continued = match.groups()
                if file:
                    current = ROOT / file
                    if not current.is_file():
                        missing.append(f"{doc.name}: {file}")
                        continue
                name = named if file else continued
                if name and current is not None and current.is_file() and name not in defined_tests(current):
                    missing.append(f"{doc.name}: {current.relative_to(ROOT)}::{name}")
    assert not missing, missing
