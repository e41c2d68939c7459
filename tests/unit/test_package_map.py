"""The package map at the top of docs/design.md names every module, and nothing else: a
module added, moved or removed without its line there fails here, so the map the next
engineer reads cannot go stale."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPED_TREES = ("operator/celery_reconciler", "celery_app")
BLOCK = re.compile(r"<!-- package-map -->\n```\n(.*?)```\n<!-- /package-map -->", re.S)


def map_entries() -> list[tuple[str, bool]]:
    """(path from the repository root, whether a line stands under it) for every line."""
    found = BLOCK.search((ROOT / "docs" / "design.md").read_text())
    assert found, "docs/design.md has no <!-- package-map --> block"
    lines = [line for line in found.group(1).splitlines() if line.strip()]
    entries: list[tuple[str, bool]] = []
    parents: list[tuple[int, str]] = []  # (indent, path) of the enclosing folders
    for index, line in enumerate(lines):
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = f"{parents[-1][1]}{name}" if parents else name
        following = lines[index + 1] if index + 1 < len(lines) else ""
        has_children = len(following) - len(following.lstrip(" ")) > indent
        entries.append((path, has_children))
        if name.endswith("/"):
            parents.append((indent, path))
    return entries


def modules() -> set[str]:
    """Modules git sees, tracked or new: not what a wheel build leaves in ``build/``."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *MAPPED_TREES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {path for path in listed if path.endswith(".py") and not path.endswith("__init__.py")}


def test_every_module_has_exactly_one_line_in_the_package_map() -> None:
    entries = map_entries()
    covering: dict[str, list[str]] = {module: [] for module in modules()}
    for path, has_children in entries:
        if path.endswith("/") and has_children:
            continue  # a folder whose modules have lines of their own
        for module in covering:
            if module == path or (path.endswith("/") and module.startswith(path)):
                covering[module].append(path)
    unmapped = sorted(module for module, lines in covering.items() if not lines)
    twice = sorted(module for module, lines in covering.items() if len(lines) > 1)
    assert unmapped == [], f"add these modules to the package map in docs/design.md: {unmapped}"
    assert twice == [], f"these modules have more than one line in the package map: {twice}"


def test_every_line_of_the_package_map_names_a_module_or_folder_that_exists() -> None:
    missing = [path for path, _ in map_entries() if not (ROOT / path).exists()]
    assert missing == [], f"the package map in docs/design.md names what is gone: {missing}"
