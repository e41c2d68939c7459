"""``make compat``: the worker distribution's declared ranges, run rather than declared.

``celery_app/pyproject.toml`` tells users which Celery, psycopg, Django and Python the worker
package works with; users' images run whatever they already have. This script builds the
worker wheel once, then runs ``tests/integration/test_worker_wheel.py`` once per row of
``MATRIX`` — each run a fresh venv of that row's interpreter and pins, holding the wheel, in
which real ``celery worker``s (a plain app with ``fenced_transaction``, a Django app with
``fenced_atomic()``) process what the operator's real sweep publishes on Redis and RabbitMQ.

The matrix is not the cross product (2 cores): every Celery minor the range claims at least
once, every Python with the newest Celery, every Django major, psycopg's oldest and newest
minor. Pins name a minor (``~=5.3.0``), so each row runs that minor's newest patch; kombu
runs at the row's Celery minor. Rows run
one after another, each in a pytest process of its own; the script prints the matrix with
each row's verdict and exits non-zero if any row failed.

    make compat                        # every row
    make compat COMPAT_ARGS="-k 5.3"   # the rows whose name contains "5.3"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
WORKER_PROJECT = REPOSITORY / "celery_app"
WHEEL_TEST = "tests/integration/test_worker_wheel.py"
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"


@dataclasses.dataclass(frozen=True)
class Row:
    python: str
    celery: str
    django: str
    psycopg: str

    @property
    def name(self) -> str:
        return f"py{self.python} celery {self.celery} django {self.django} psycopg {self.psycopg}"

    def requirements(self) -> list[str]:
        return [
            f"celery[redis]~={self.celery}.0",
            # kombu at the Celery's own minor, as an image built with that Celery holds:
            # Celery 5.3 and 5.4 accept any kombu 5, and kombu 5.7's Redis transport needs
            # `packaging`, which their celery[redis] extra does not install.
            f"kombu~={self.celery}.0",
            f"Django~={self.django}.0",
            f"psycopg~={self.psycopg}.0",
        ]


# Django 6 requires Python >= 3.12, so the 3.11 rows run Django 4.2 or 5.2.
MATRIX = (
    Row(python="3.11", celery="5.3", django="4.2", psycopg="3.1"),
    Row(python="3.11", celery="5.4", django="4.2", psycopg="3.2"),
    Row(python="3.12", celery="5.5", django="5.2", psycopg="3.2"),
    Row(python="3.11", celery="5.6", django="5.2", psycopg="3.3"),
    Row(python="3.11", celery="5.7", django="5.2", psycopg="3.3"),
    Row(python="3.12", celery="5.7", django="6.1", psycopg="3.3"),
    Row(python="3.13", celery="5.7", django="6.1", psycopg="3.3"),
)


def interpreter(version: str) -> str:
    """The newest installed patch of Python ``version``: pyenv's, else one on PATH."""
    candidates = sorted(
        PYENV_VERSIONS.glob(f"{version}.*/bin/python{version}"),
        key=lambda path: [int(part) for part in path.parts[-3].split(".") if part.isdigit()],
    )
    if candidates:
        return str(candidates[-1])
    found = shutil.which(f"python{version}")
    if found is None:
        raise SystemExit(f"compat: no Python {version} (looked in {PYENV_VERSIONS} and PATH)")
    return found


def build_wheel(*, into: Path) -> Path:
    source = into / "source"
    shutil.copytree(
        WORKER_PROJECT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--wheel-dir", str(into / "wheels"), str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = (into / "wheels").glob("celery_reconciler_worker-*.whl")
    return wheel


def run_row(row: Row, *, wheel: Path, pytest_args: list[str]) -> tuple[bool, str]:
    """Run the wheel test for ``row``; return its verdict and the venv's installed versions."""
    env = dict(os.environ) | {
        "WORKER_COMPAT_PYTHON": interpreter(row.python),
        "WORKER_COMPAT_REQUIREMENTS": shlex.join(row.requirements()),
        "WORKER_COMPAT_WHEEL": str(wheel),
    }
    print(f"\n== compat: {row.name}", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", WHEEL_TEST, "-q", "-s", "-p", "no:cacheprovider",
         *pytest_args],
        cwd=REPOSITORY, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    installed = next(
        (line.split(": ", 1)[1] for line in output.splitlines() if "worker venv compat:" in line),
        "(no venv)",
    )
    summary = output.strip().splitlines()[-1] if output.strip() else "(no output)"
    if done.returncode != 0:
        print(output[-8000:])
    print(f"   {installed}\n   {summary}", flush=True)
    return done.returncode == 0, installed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", default="", help="only rows whose name has this")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    options = parser.parse_args()
    rows = [row for row in MATRIX if options.select in row.name]
    if not rows:
        raise SystemExit(f"compat: no row matches {options.select!r}")
    with tempfile.TemporaryDirectory(prefix="compat-") as scratch:
        wheel = build_wheel(into=Path(scratch))
        print(f"compat: built {wheel.name}; {len(rows)} rows")
        verdicts = [
            (row, *run_row(row, wheel=wheel, pytest_args=options.pytest_args)) for row in rows
        ]
    print("\ncompat matrix (Python, Celery, Django, psycopg: the newest patch of each minor)")
    print(f"  {'result':6}  {'python':6}  {'celery':6}  {'django':6}  {'psycopg':7}  installed")
    for row, passed, installed in verdicts:
        print(
            f"  {'pass' if passed else 'FAIL':6}  {row.python:6}  {row.celery:6}  "
            f"{row.django:6}  {row.psycopg:7}  {installed}"
        )
    failed = sum(not passed for _, passed, _ in verdicts)
    print(f"compat: {len(verdicts) - failed} of {len(verdicts)} rows passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
