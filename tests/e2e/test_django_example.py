"""The Django example, run by the commands of its docs page, against the real operator.

``examples/mindjourney`` is a Django project like the app celery-reconciler grew from. This
test runs the shell block of docs/coming-from-celery-beat.md (``devstack.django_example``)
with real PostgreSQL and Redis, the operator as a real process against the real apiserver,
and ``celery -A mindjourney worker`` processes of the example, which reach the ledger through
Django's connection (no ``CELERY_RECONCILER_DSN`` in their environment). Two workers are
SIGKILLed in the middle of a task body; each comes back (the page's command, run again, as a
restarted container). The verdict is read from the database: every entry processed, one
``insights_revision`` row per entry, and each killed body in the ledger as a lost attempt.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from e2e_support import OperatorProcess, wait_for

from devstack import django_example, processes
from devstack import kube as devstack_kube

NAMESPACE = "mindjourney"  # the page's
HEARTBEAT_TIMEOUT_SECONDS = 6
# The stand-in for the original app's language model call: long enough to kill a body in it.
MODEL_SECONDS = 1.0


@pytest.fixture
def page_namespace(crds: devstack_kube.ControlPlane) -> Iterator[str]:
    """The page creates the namespace itself; the test removes it."""
    yield NAMESPACE
    crds.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.fixture
def started() -> Iterator[list[processes.ManagedProcess]]:
    """The runbook's background processes; stopped (what a kill left, too) at the end."""
    processes_: list[processes.ManagedProcess] = []
    yield processes_
    for process in processes_:
        process.stop(timeout_seconds=20)


def scalar(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


def processed(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM journal_entry WHERE insights_extracted"))


def running_under(dsn: str, worker: str) -> int:
    """Attempts whose body runs now in a process of ``worker`` (its ``HOSTNAME``); none
    before the operator's first sweep created the ledger."""
    if scalar(dsn, "SELECT to_regclass('celery_reconciler.entries')") is None:
        return 0
    return int(
        scalar(
            dsn,
            "SELECT count(*) FROM celery_reconciler.entries WHERE state = 'running' "
            "AND worker = %s",
            (worker,),
        )
    )


def status_row(table: str) -> dict[str, str]:
    """The one row of ``kubectl get processingstatus NAME``, by header; the leading columns
    never hold an empty cell (OLDEST(S) may, further right)."""
    lines = table.splitlines()
    return dict(zip(lines[0].split(), lines[1].split(), strict=False)) if len(lines) > 1 else {}


def worker_name(step: django_example.Step) -> str:
    """The node name the page gives the worker (``-n worker1@%h``), used as its HOSTNAME."""
    found = re.search(r"-n (\w+)@", step.command)
    assert found, f"the page's worker command names no node: {step.command}"
    return found.group(1)


def test_the_django_example_writes_each_entrys_insights_exactly_once_across_worker_kills(
    crds: devstack_kube.ControlPlane,
    page_namespace: str,
    database_dsn: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    started: list[processes.ManagedProcess],
    tmp_path: Path,
) -> None:
    steps = django_example.runbook()
    at_status = next(i for i, s in enumerate(steps) if " get processingstatus " in s.command)
    setup, status_step, afterwards = steps[:at_status], steps[at_status], steps[at_status + 1 :]
    assert (
        status_step.command == f"kubectl -n {page_namespace} get processingstatus journal-insights"
    )
    worker_steps = [step for step in setup if step.background]
    assert len(worker_steps) == 2
    assert all(s.command.startswith("celery -A mindjourney worker") for s in worker_steps)

    start_operator()
    env = django_example.environment(
        crds.env(),
        DATABASE_URL=database_dsn,
        CELERY_BROKER_URL=redis_url,
        CELERY_RECONCILER_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT_SECONDS),
        INSIGHTS_MODEL_SECONDS=str(MODEL_SECONDS),
    )
    lives: dict[str, int] = {}
    running: dict[str, processes.ManagedProcess] = {}
    commands: dict[str, django_example.Step] = {}

    def start_worker(step: django_example.Step) -> None:
        name = worker_name(step)
        lives[name] = lives.get(name, 0) + 1
        commands[name] = step
        running[name] = django_example.start(
            step,
            env={**env, "HOSTNAME": name},
            name=f"django-{name}-{lives[name]}",
            log_dir=tmp_path,
        )
        started.append(running[name])

    for step in setup:
        if step.background:
            start_worker(step)
        else:
            django_example.run(step, env=env)
    entries = int(scalar(database_dsn, "SELECT count(*) FROM journal_entry"))
    assert entries > 0

    killed: list[str] = []
    for name, progress in zip(sorted(running), (0.0, 0.4), strict=True):
        wait_for(
            lambda progress=progress: processed(database_dsn) >= progress * entries,
            timeout_seconds=180,
            what=f"{progress:.0%} of the entries processed",
        )
        wait_for(
            lambda name=name: running_under(database_dsn, name) > 0,
            timeout_seconds=60,
            what=f"a body running in {name}",
            interval=0.05,
        )
        running[name].kill()  # mid-body: the body sleeps MODEL_SECONDS in the model call
        killed.append(name)
        start_worker(commands[name])  # the container's restart

    wait_for(
        lambda: processed(database_dsn) == entries,
        timeout_seconds=240,
        what=f"all {entries} entries processed",
    )
    status = wait_for(
        lambda: (
            (row := status_row(django_example.run(status_step, env=env).stdout))
            and row["SUCCEEDED"] == str(entries)
            and row
        ),
        timeout_seconds=60,
        what=f"kubectl get processingstatus to show {entries} succeeded",
    )
    assert (status["PENDING"], status["IN-FLIGHT"], status["DEAD"]) == ("0", "0", "0")
    # The original app's command names, now calling the CLI: a sweep on request, the status.
    run_now, check_status = afterwards
    assert run_now.command.startswith("python manage.py retry_unprocessed_entries --run-now")
    swept = django_example.run(run_now, env=env).stdout
    assert swept.startswith(f"{page_namespace}/journal-insights swept"), swept
    assert check_status.command.startswith("python manage.py check_processing_status")
    checked = status_row(django_example.run(check_status, env=env).stdout)
    assert (checked["POLICY"], checked["SUCCEEDED"]) == ("journal-insights", str(entries)), checked

    with psycopg.connect(database_dsn) as conn:
        revisions = dict(
            conn.execute(
                "SELECT e.id, count(r.id) FROM journal_entry e "
                "LEFT JOIN insights_revision r ON r.entry_id = e.id GROUP BY e.id"
            ).fetchall()
        )
        states = dict(
            conn.execute(
                "SELECT state, count(*) FROM celery_reconciler.entries GROUP BY state"
            ).fetchall()
        )
        lost = dict(
            conn.execute(
                "SELECT worker, count(*) FROM celery_reconciler.attempts "
                "WHERE outcome = 'lost' GROUP BY worker"
            ).fetchall()
        )
        missing_insights = conn.execute(
            "SELECT count(*) FROM journal_entry WHERE insights IS NULL"
        ).fetchone()
    print(
        f"entries {entries}, workers killed mid-body {killed}, lost attempts {lost}, "
        f"revisions written {sum(revisions.values())}, ledger {states}"
    )
    assert sorted(set(revisions.values())) == [1], {
        entry: n for entry, n in revisions.items() if n != 1
    }
    assert missing_insights == (0,)
    assert states == {"succeeded": entries}
    # Each kill cut a body short: its attempt ended as lost and its entry ran again.
    assert all(lost.get(name, 0) >= 1 for name in killed), lost
    password = urllib.parse.urlsplit(database_dsn).password
    assert password
    for log in tmp_path.glob("django-*.log"):
        assert password not in log.read_text(errors="replace"), f"{log.name} shows the password"
