"""The worker distribution's boundary, checked from the source tree in milliseconds.

Users put ``celery-reconciler-worker`` in their worker images, so it must not reach into the
operator, its requirements must be ranges that coexist with theirs, and the operator must
require exactly the version this repository builds. The built wheel itself, installed alone
in a fresh venv and running a real worker, is tests/integration/test_worker_wheel.py.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
WORKER_PACKAGE = ROOT / "celery_app" / "celery_reconciler_worker"
OPERATOR_ONLY = ("celery_reconciler", "kopf", "kubernetes", "prometheus_client", "yaml")


def _project(path: Path) -> dict[str, object]:
    project: dict[str, object] = tomllib.loads(path.read_text())["project"]
    return project


def _requirements(project: dict[str, object]) -> list[Requirement]:
    dependencies = project["dependencies"]
    assert isinstance(dependencies, list)
    return [Requirement(text) for text in dependencies]


def test_the_worker_package_imports_nothing_of_the_operator() -> None:
    imported: dict[str, set[str]] = {}
    for module in WORKER_PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(), filename=str(module))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(module.name)
    assert {top: files for top, files in imported.items() if top in OPERATOR_ONLY} == {}


def test_the_worker_requires_only_celery_and_psycopg_as_ranges() -> None:
    requirements = _requirements(_project(ROOT / "celery_app" / "pyproject.toml"))
    assert sorted(requirement.name for requirement in requirements) == ["celery", "psycopg"]
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        # A lower bound for the APIs we use, an upper bound before the next major; never a
        # pin, which would fight the user's own requirements.
        assert operators == {">=", "<"}, requirement


def test_the_operator_requires_the_worker_version_this_repository_builds() -> None:
    worker = _project(ROOT / "celery_app" / "pyproject.toml")
    (pinned,) = [
        requirement
        for requirement in _requirements(_project(ROOT / "pyproject.toml"))
        if requirement.name == worker["name"]
    ]
    assert str(pinned.specifier) == f"=={worker['version']}"


def test_the_old_import_path_warns_and_is_the_new_module() -> None:
    from celery_reconciler_worker import reliable

    # A fresh import of the alias (it may have run already in this session); the module it
    # stands for stays loaded, so nothing else is re-executed.
    sys.modules.pop("celery_app.reliable", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import celery_app.reliable as old

    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    assert "celery_reconciler_worker.reliable" in str(deprecations[0].message)
    # Charged to the importing line, so users see where to change their import.
    assert deprecations[0].filename == __file__
    assert old is reliable
    assert sys.modules["celery_app.reliable"] is reliable


def _compat_matrix() -> tuple[Any, ...]:
    spec = importlib.util.spec_from_file_location("compat", ROOT / "scripts" / "compat.py")
    assert spec is not None and spec.loader is not None
    compat = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module runs.
    sys.modules.setdefault("compat", compat)
    spec.loader.exec_module(compat)
    matrix: tuple[Any, ...] = compat.MATRIX
    return matrix


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_declared_ranges_are_the_ones_make_compat_runs() -> None:
    """Each range the worker declares starts at the oldest minor ``make compat`` runs and
    ends before the major after the newest it runs; every Celery minor in between runs."""
    project = _project(ROOT / "celery_app" / "pyproject.toml")
    optional = project["optional-dependencies"]
    assert isinstance(optional, dict)
    declared = {
        requirement.name.lower(): requirement
        for requirement in [*_requirements(project), *map(Requirement, optional["django"])]
    }
    matrix = _compat_matrix()
    for name in ("celery", "psycopg", "django"):
        run = sorted({_version(getattr(row, name)) for row in matrix})
        bounds = {spec.operator: _version(spec.version) for spec in declared[name].specifier}
        assert bounds == {">=": run[0], "<": (run[-1][0] + 1,)}, (name, bounds, run)
    celery_minors = sorted({_version(row.celery)[1] for row in matrix})
    assert celery_minors == list(range(celery_minors[0], celery_minors[-1] + 1))
    pythons = sorted({_version(row.python) for row in matrix})
    requires_python = project["requires-python"]
    assert requires_python == ">={}.{}".format(*pythons[0])
    classifiers = project["classifiers"]
    assert isinstance(classifiers, list)
    assert (
        sorted(
            _version(line.rsplit(" :: ", 1)[1])
            for line in classifiers
            if line.startswith("Programming Language :: Python :: 3.")
        )
        == pythons
    )
