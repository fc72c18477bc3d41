"""README's module table names every module of the gateway package, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def table_entries() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_the_module_table_matches_the_package() -> None:
    package = ROOT / "gateway"
    modules = {str(path.relative_to(package)) for path in package.rglob("*.py") if path.name != "__init__.py"}
    entries = table_entries()
    listed_modules = {entry for entry in entries if entry.endswith(".py")}
    assert listed_modules == modules, {
        "not in the table": sorted(modules - listed_modules),
        "in the table, not in the package": sorted(listed_modules - modules),
    }
    for folder in entries - listed_modules:  # data folders such as lua/
        assert (package / folder).is_dir(), folder
