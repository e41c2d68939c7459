"""The worker wheel, installed alone in a fresh venv, runs a real worker the operator feeds.

Every other test imports the worker package from this checkout, next to the operator, so
none of them would notice the wheel reaching for ``celery_reconciler`` or missing a file.
Here the wheel is built from the checkout's ``celery_app/`` as the docs say, installed into
a fresh venv (no system site packages) with nothing but what the resolver picks for it
(celery, psycopg and theirs, Django through the ``django`` extra) plus ``celery[redis]``,
which a Celery-on-Redis image has anyway, and a user's app of a few lines — written into a
directory of its own, not this checkout — runs there as a real ``celery worker``. The
operator's real sweep, from the test's venv, dispatches to it; the outcome is read from the
ledger. Nothing is skipped: no PyPI, no wheel, no libpq is a failure that says so.

Two user apps run in each venv: a plain Celery one whose body commits through
``fenced_transaction``, and a Django one whose body writes through the ORM inside
``fenced_atomic()`` and reaches the ledger through Django's ``DATABASES`` (no
``CELERY_RECONCILER_DSN``). Both take the fence, heartbeat and record their attempts in the
ledger, and both consume the messages the operator publishes on Redis and on RabbitMQ.

Which versions a venv holds is a parameter (``VenvSpec``). By default the module runs two
venvs: what the resolver picks today (the newest release in every declared range) and the
lower bound of every range the worker's pyproject declares (the newest patch of its oldest
Celery minor, Django and psycopg), so a declared lower bound the suite never ran cannot
hide. ``make compat`` (``scripts/compat.py``) runs the module once per row of its matrix
instead, naming the row through ``WORKER_COMPAT_PYTHON`` (the interpreter),
``WORKER_COMPAT_REQUIREMENTS`` (the pins) and ``WORKER_COMPAT_WHEEL`` (the wheel it built
once for every row).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from reconcile_support import make_policy, pending_count, sweep_until, wait_for

from celery_app.demo import schema, settings
from devstack import processes

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
WORKER_PROJECT = REPOSITORY / "celery_app"
OPERATOR_ONLY = ("celery-reconciler", "kopf", "kubernetes", "prometheus-client")
# Entries whose id is a multiple of this fail their first attempt, so the wheel's own retry
# path (retry rules, backoff, the failure record) runs too, not only the happy one.
FAIL_FIRST_EVERY = 5
ENTRIES = 30
# The packages whose declared lower bound the "oldest" venv installs.
RANGED = ("celery", "psycopg", "django")


@dataclass(frozen=True)
class VenvSpec:
    """What one worker venv holds: an interpreter and requirement pins beside the wheel."""

    name: str
    python: str
    requirements: tuple[str, ...]
    wheel: Path | None = None


def _declared_lower_bounds() -> dict[str, str]:
    """``{"celery": "5.3", ...}``: the ``>=`` bound of each ranged requirement of the wheel."""
    project = tomllib.loads((WORKER_PROJECT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["django"]]
    bounds: dict[str, str] = {}
    for requirement in declared:
        matched = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
        assert matched, f"{requirement!r} declares no lower bound"
        bounds[matched[1].lower()] = matched[2]
    assert sorted(bounds) == sorted(RANGED), bounds
    return bounds


def _venv_specs() -> list[VenvSpec]:
    python = os.environ.get("WORKER_COMPAT_PYTHON")
    if python:
        wheel = os.environ.get("WORKER_COMPAT_WHEEL")
        return [
            VenvSpec(
                name="compat",
                python=python,
                requirements=tuple(shlex.split(os.environ.get("WORKER_COMPAT_REQUIREMENTS", ""))),
                wheel=Path(wheel) if wheel else None,
            )
        ]
    # "~=5.3.0" is the newest 5.3.x: the oldest minor, with the fixes its users would have.
    bounds = _declared_lower_bounds()
    oldest = tuple(f"{name}~={bound}.0" for name, bound in bounds.items())
    # kombu at the Celery's own minor, as an image built with that Celery holds (Celery 5.3
    # and 5.4 accept kombu 5.7, whose Redis transport needs a module their extra lacks).
    oldest += (f"kombu~={bounds['celery']}.0",)
    return [
        VenvSpec(name="newest", python=sys.executable, requirements=()),
        VenvSpec(name="oldest", python=sys.executable, requirements=oldest),
    ]


USER_APP = '''
"""A user's worker app: celery, psycopg and celery-reconciler-worker, nothing else."""

import json
import os

import psycopg
from celery import Celery

from celery_reconciler_worker import reliable

print("reliable-module", reliable.__file__, flush=True)

app = Celery("wheel_user_app", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(reliable.recommended_settings(lease_seconds=60))


@app.task(base=reliable.ReconciledTask, name={task_name!r})
def extract_insights(entry_id: str) -> None:
    with psycopg.connect(os.environ["CELERY_RECONCILER_DSN"], autocommit=True) as conn:
        if int(entry_id) % {fail_first_every} == 0 and conn.execute(
            "INSERT INTO wheel_first_attempts (entry_id) VALUES (%s) "
            "ON CONFLICT DO NOTHING RETURNING entry_id",
            [entry_id],
        ).fetchone():
            raise RuntimeError(f"entry {{entry_id}} fails its first attempt on purpose")
        with reliable.fenced_transaction(conn):
            conn.execute(
                "UPDATE journal_entry SET insights = %s, insights_extracted = true "
                "WHERE id = %s",
                [json.dumps({{"mood": "calm"}}), int(entry_id)],
            )
'''

# A user's Django project, as small as Django allows: settings, one app whose model maps the
# demo's table (unmanaged: the seed created it), and the worker module.
DJANGO_SETTINGS = """
import os

from psycopg import conninfo

_database = conninfo.conninfo_to_dict(os.environ["WHEEL_USER_DATABASE_URL"])
SECRET_KEY = "wheel-user-site"
INSTALLED_APPS = ["wheel_user_site"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _database.get("dbname", ""),
        "USER": _database.get("user", ""),
        "PASSWORD": _database.get("password", ""),
        "HOST": _database.get("host", ""),
        "PORT": _database.get("port", ""),
    }
}
"""

DJANGO_MODELS = """
from django.db import models


class JournalEntry(models.Model):
    insights = models.JSONField(null=True)
    insights_extracted = models.BooleanField(default=False)

    class Meta:
        managed = False
        db_table = "journal_entry"
"""

DJANGO_USER_APP = '''
"""A user's Django worker: the ledger through Django's connection, no CELERY_RECONCILER_DSN."""

import os

import django
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wheel_user_site.settings")
django.setup()

from django.db import connection

from celery_reconciler_worker import django as reliable_django
from wheel_user_site.models import JournalEntry

print("reliable-module", reliable_django.__file__, flush=True)

app = Celery("wheel_django_app", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(reliable_django.recommended_settings(lease_seconds=60))


@app.task(base=reliable_django.ReconciledTask, name={task_name!r})
def extract_insights(entry_id: str) -> None:
    if int(entry_id) % {fail_first_every} == 0:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO wheel_first_attempts (entry_id) VALUES (%s) "
                "ON CONFLICT DO NOTHING RETURNING entry_id",
                [entry_id],
            )
            if cursor.fetchone():
                raise RuntimeError(f"entry {{entry_id}} fails its first attempt on purpose")
    with reliable_django.fenced_atomic():
        JournalEntry.objects.filter(pk=int(entry_id)).update(
            insights={{"mood": "calm"}}, insights_extracted=True
        )
'''


def _write_user_app(flavour: str, *, app_dir: Path) -> str:
    """Write the user's app of ``flavour`` into ``app_dir``; return its module's name."""
    values = {"task_name": schema.TASK_NAME, "fail_first_every": FAIL_FIRST_EVERY}
    if flavour == "plain":
        (app_dir / "wheel_user_app.py").write_text(textwrap.dedent(USER_APP).format(**values))
        return "wheel_user_app"
    site = app_dir / "wheel_user_site"
    site.mkdir()
    (site / "__init__.py").write_text("")
    (site / "settings.py").write_text(DJANGO_SETTINGS)
    (site / "models.py").write_text(DJANGO_MODELS)
    (app_dir / "wheel_django_app.py").write_text(DJANGO_USER_APP.format(**values))
    return "wheel_django_app"


def _run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# What reaching PyPI from this machine may need (an index, a proxy, a CA bundle); nothing
# else of the test's environment reaches the venv's processes.
_NETWORK_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a fresh shell in the venv: nothing of the test's interpreter."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("HOME", "LANG")
        or key.startswith(("PIP_", "UV_"))
        or key.upper() in _NETWORK_VARIABLES
    }
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _build_wheel(root: Path) -> Path:
    # A copy, so a build leaves nothing (build/, *.egg-info) in the checkout.
    source = root / "source"
    shutil.copytree(
        WORKER_PROJECT,
        source,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
    )
    wheels = root / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(source)],
        cwd=root, env=dict(os.environ),
    )  # fmt: skip
    (wheel,) = wheels.glob("celery_reconciler_worker-*.whl")
    print(f"worker wheel {wheel.name}: {wheel.stat().st_size} bytes")
    return wheel


@pytest.fixture(scope="module")
def checkout_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout's worker project, built once for every venv of the module:
    the venvs differ in what they install beside it, never in the wheel."""
    return _build_wheel(tmp_path_factory.mktemp("worker-wheel-build"))


@pytest.fixture(scope="module", params=_venv_specs(), ids=lambda spec: spec.name)
def worker_venv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the worker wheel, its Django extra and the spec's pins."""
    spec: VenvSpec = request.param
    root = tmp_path_factory.mktemp(f"worker-wheel-{spec.name}")
    # Asked for here, not as an argument: a row of `make compat` brings its own wheel.
    wheel = spec.wheel or request.getfixturevalue("checkout_wheel")
    venv = root / "venv"
    _run([spec.python, "-m", "venv", str(venv)], cwd=root, env=dict(os.environ))
    config = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config, config
    env = _clean_env(venv)
    # uv resolves as pip does, in a fraction of the time a venv per row of `make compat`
    # would otherwise cost; it ships in the dev venv (pyproject's dev requirements).
    uv = Path(sys.executable).with_name("uv")
    # The broker transport is the user's choice, not a requirement of ours: AMQP's client
    # comes with celery, Redis's is the celery[redis] extra every Redis user installs.
    _run(
        [str(uv), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
         f"celery-reconciler-worker[django] @ {wheel.as_uri()}", "celery[redis]",
         *spec.requirements],
        cwd=root, env=env,
    )  # fmt: skip
    installed = _installed_versions(venv)
    python_version = _run(
        [str(venv / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
        cwd=root,
        env=env,
    ).strip()
    print(
        f"worker venv {spec.name}: Python {python_version}, "
        + ", ".join(f"{name} {installed[name]}" for name in ("celery", "kombu", *RANGED[1:]))
    )
    return venv


def _installed_versions(venv: Path) -> dict[str, str]:
    listed = json.loads(
        _run(
            [str(venv / "bin" / "pip"), "list", "--format=json"],
            cwd=venv,
            env=_clean_env(venv),
        )
    )
    return {package["name"].lower(): package["version"] for package in listed}


def test_the_wheel_requires_only_celery_and_psycopg(worker_venv: Path) -> None:
    env = _clean_env(worker_venv)
    shown = _run(
        [str(worker_venv / "bin" / "pip"), "show", "celery-reconciler-worker"],
        cwd=worker_venv,
        env=env,
    )
    fields = dict(line.split(": ", 1) for line in shown.splitlines() if ": " in line)
    requires = {name.strip().lower() for name in fields["Requires"].split(",")}
    print("Requires:", fields["Requires"])
    assert requires == {"celery", "psycopg"}
    version = tomllib.loads((WORKER_PROJECT / "pyproject.toml").read_text())["project"]["version"]
    assert fields["Version"] == version
    names = set(_installed_versions(worker_venv))
    assert sorted(names & set(OPERATOR_ONLY)) == []


def test_the_venv_imports_the_worker_package_and_not_the_operator(
    worker_venv: Path, tmp_path: Path
) -> None:
    env = _clean_env(worker_venv)
    python = str(worker_venv / "bin" / "python")
    located = _run(
        [python, "-c", "import celery_reconciler_worker.reliable as r; print(r.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert located.strip().startswith(str(worker_venv / "lib")), located
    for operator_module in ("celery_reconciler", "kopf", "kubernetes", "prometheus_client"):
        probe = subprocess.run(
            [python, "-c", f"import {operator_module}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert probe.returncode != 0, f"{operator_module} is importable in the worker venv"
        assert "ModuleNotFoundError" in probe.stderr, probe.stderr


def test_the_recommended_settings_are_the_ones_the_installed_celery_knows(
    worker_venv: Path, tmp_path: Path
) -> None:
    """A setting Celery does not know is silently ignored: the preset would promise a
    behaviour (``worker_disable_prefetch``, Celery >= 5.6) that the user's Celery does not
    have. Where Celery knows it, the preset must still set it."""
    script = (
        "import json; from celery.app import defaults; "
        "from celery_reconciler_worker import reliable; "
        "print(json.dumps([sorted(reliable.recommended_settings()), sorted(defaults.DEFAULTS)]))"
    )
    preset, known = json.loads(
        _run(
            [str(worker_venv / "bin" / "python"), "-c", script],
            cwd=tmp_path,
            env=_clean_env(worker_venv),
        )
    )
    assert sorted(set(preset) - set(known)) == []
    assert ("worker_disable_prefetch" in preset) == ("worker_disable_prefetch" in known)


@pytest.mark.parametrize("flavour", ["plain", "django"])
def test_a_worker_from_the_wheel_processes_what_the_operator_dispatches(
    worker_venv: Path,
    flavour: str,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    broker_url: str,
    tmp_path: Path,
) -> None:
    conn.execute("CREATE TABLE wheel_first_attempts (entry_id text PRIMARY KEY)")
    schema.seed(conn, count=ENTRIES)
    app_dir = tmp_path / "user-app"
    app_dir.mkdir()
    app_module = _write_user_app(flavour, app_dir=app_dir)
    worker_name = "wheel-worker"
    # The Django app reaches the ledger through DATABASES alone, as its docs promise.
    database = (
        {"CELERY_RECONCILER_DSN": demo_dsn}
        if flavour == "plain"
        else {"WHEEL_USER_DATABASE_URL": demo_dsn}
    )
    env = (
        _clean_env(worker_venv)
        | database
        | {
            "PYTHONPATH": str(app_dir),
            "PYTHONUNBUFFERED": "1",
            "CELERY_BROKER_URL": broker_url,
            "HOSTNAME": worker_name,
        }
    )
    worker = processes.ManagedProcess(
        name=f"worker:{worker_name}",
        argv=[
            str(worker_venv / "bin" / "celery"), "-A", app_module, "worker",
            "-Q", settings.QUEUE, "-c", "2", "--pool", "prefork", "-n", f"{worker_name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
        ],
        log_path=tmp_path / "wheel-worker.log",
        env=env,
        cwd=app_dir,
    )  # fmt: skip
    worker.start()
    try:
        worker.wait_until(
            lambda: " ready." in worker.log_path.read_text(errors="replace"),
            timeout_seconds=60,
            what="ready",
        )
        policy = make_policy(lease_timeout="60s")
        sweep_until(
            lambda: pending_count(conn) == 0,
            policy_=policy,
            dsn=demo_dsn,
            broker_url=broker_url,
            timeout_seconds=120,
            interval_seconds=0.5,
        )
        wait_for(
            lambda: (
                dict(
                    conn.execute(
                        "SELECT state, count(*) FROM celery_reconciler.entries GROUP BY state"
                    ).fetchall()
                )
                == {"succeeded": ENTRIES}
            ),
            timeout_seconds=30,
            what="every entry succeeded in the ledger",
        )
        log = worker.log_path.read_text(errors="replace")
    finally:
        worker.stop(timeout_seconds=20)

    # The worker ran the wheel's code, installed in its venv, not this checkout's.
    assert f"reliable-module {worker_venv / 'lib'}" in log, log[-3000:]
    attempts = conn.execute(
        "SELECT entry_id, outcome, worker, retry_at IS NOT NULL, error "
        "FROM celery_reconciler.attempts ORDER BY id"
    ).fetchall()
    failing = {
        str(row[0])
        for row in conn.execute(
            "SELECT id FROM journal_entry WHERE id %% %s = 0", [FAIL_FIRST_EVERY]
        )
    }
    assert failing, "the seed holds no entry that fails its first attempt"
    failed = {
        (entry_id, retried) for entry_id, outcome, _, retried, _ in attempts if outcome == "failed"
    }
    assert failed == {(entry_id, True) for entry_id in failing}
    assert all("on purpose" in error for _, outcome, _, _, error in attempts if outcome == "failed")
    succeeded = [entry_id for entry_id, outcome, _, _, _ in attempts if outcome == "succeeded"]
    assert sorted(succeeded) == sorted({entry_id for entry_id, *_ in attempts})
    assert len(succeeded) == ENTRIES
    assert {worker_name} == {row[2] for row in attempts}
    retried = dict(
        conn.execute(
            "SELECT entry_id, attempt FROM celery_reconciler.entries WHERE entry_id = ANY(%s)",
            [sorted(failing)],
        ).fetchall()
    )
    assert retried == dict.fromkeys(failing, 2)
    incarnations = conn.execute(
        "SELECT count(*) FROM celery_reconciler.incarnations WHERE hostname = %s", [worker_name]
    ).fetchone()
    assert incarnations is not None and incarnations[0] >= 1
    processed = conn.execute(
        "SELECT count(*) FROM journal_entry WHERE insights_extracted AND insights ? 'mood'"
    ).fetchone()
    assert processed == (ENTRIES,)
