"""Every code name the docs mention exists: a renamed or removed function shows here, not
as a reader's dead end (``ledger.consumption`` stayed in docs/concepts.md after the code
dropped it)."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
import types
import warnings
from pathlib import Path

import celery_reconciler
import celery_reconciler_worker
import devstack

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `module.name` or `package.module.name.attribute`, inside backticks, optionally called.
REFERENCE = re.compile(r"`((?:[a-z_][a-z0-9_]*\.)+[A-Za-z_][A-Za-z0-9_]*)(?:\(\))?`")
# The ledger's tables are written `celery_reconciler.<table>`, as a DBA sees them.
TABLES = set(
    re.findall(
        r'sql\.Identifier\(SCHEMA, "([a-z_]+)"\)',
        (ROOT / "celery_app" / "celery_reconciler_worker" / "ledger.py").read_text(),
    )
)
# Names the docs mention that look like code but are not a Python attribute.
NOT_CODE = {"chaos.process_entry": "the chaos app's Celery task name"}
# First words that in the docs name another library's object, not our module of that name.
OTHER_LIBRARIES = {"settings": "Django's settings (settings.DATABASES)"}
# First words that are also a spec field or a Helm value group (``sharding.enabled``,
# ``workers.podSelector``, ``metrics.service.enabled``): after these, only what looks like
# Python counts.
SHARED_WITH_SETTINGS = {"sharding", "metrics", "workers", "policy", "operator", "chaos"}


@functools.cache
def modules() -> dict[str, tuple[types.ModuleType, ...]]:
    """Our modules by short name (``ledger`` is both the operator's and the worker's)."""
    found: dict[str, list[types.ModuleType]] = {}
    with warnings.catch_warnings():
        # Walking imports every package, the deprecated alias of django_commands among them.
        warnings.simplefilter("ignore", DeprecationWarning)
        for package in (celery_reconciler, celery_reconciler_worker, devstack):
            found.setdefault(package.__name__, []).append(package)
            prefix = f"{package.__name__}."
            for info in pkgutil.walk_packages(package.__path__, prefix=prefix):
                if not info.name.endswith("__main__"):
                    module = importlib.import_module(info.name)
                    found.setdefault(info.name.rsplit(".", 1)[-1], []).append(module)
    return {name: tuple(found_modules) for name, found_modules in found.items()}


def _resolves(parts: list[str], roots: tuple[types.ModuleType, ...]) -> bool:
    for root in roots:
        target: object = root
        for part in parts:
            if hasattr(target, part):
                target = getattr(target, part)
                continue
            try:
                target = importlib.import_module(f"{getattr(target, '__name__', '')}.{part}")
            except ImportError:
                break
        else:
            return True
    return False


def _names_code(dotted: str, *, called: bool) -> bool:
    head, _, last = dotted.rpartition(".")
    if dotted in NOT_CODE or last in ("py", "md", "yaml"):
        return False
    if called or head.split(".")[0] not in SHARED_WITH_SETTINGS:
        return True
    return "_" in last or last[0].isupper()


def unresolved(text: str) -> tuple[int, list[str]]:
    """How many code names ``text`` mentions, and those that do not exist."""
    found, missing = 0, []
    for match in REFERENCE.finditer(text):
        dotted = match.group(1)
        if not _names_code(dotted, called=match.group(0).endswith("()`")):
            continue
        head, *rest = dotted.split(".")
        if head in OTHER_LIBRARIES:
            continue
        if head == "celery_reconciler" and rest and rest[0] in TABLES:
            continue
        if head == "celery_reconciler" and rest and rest[0] in modules():
            head, rest = rest[0], rest[1:]
        if head not in modules() or not rest:
            continue
        found += 1
        if not _resolves(rest, modules()[head]):
            missing.append(dotted)
    return found, missing


def test_a_name_the_code_dropped_is_caught() -> None:
    text = "reads `ledger.consumption` and `planning.pod_ending()`, not `sharding.enabled`"
    assert unresolved(text) == (2, ["ledger.consumption"])


def test_every_code_name_the_docs_mention_exists() -> None:
    mentioned, missing = 0, []
    for document in DOCUMENTS:
        count, gone = unresolved(document.read_text())
        mentioned += count
        missing += [f"{document.name}: `{name}`" for name in gone]
    assert mentioned > 25  # the pattern still finds what the docs say
    assert missing == []
