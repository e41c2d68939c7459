"""``celery_reconciler_worker.django`` in real workers of the example project.

The workers are ``celery -A mindjourney worker`` processes of ``examples/mindjourney`` with
``DATABASE_URL`` and no ``CELERY_RECONCILER_DSN``: the fence check, the done mark and the
heartbeat reach the ledger through Django's settings. Sweeps are the real
``reconcile_once`` in a thread (``Sweeper``). Effects are counted from the database: one
``insights_revision`` row per entry, written inside ``fenced_atomic()``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fencing_support import (
    HEARTBEAT_ENV,
    Sweeper,
    ledger_states,
    lost_attempts,
    seconds_since,
)
from reconcile_support import make_policy, wait_for

from celery_app.demo import audit
from devstack import django_example, processes
from devstack import postgres as devstack_postgres

MODEL_SECONDS = 4.0


@pytest.fixture
def example_env(database_dsn: str, redis_url: str) -> dict[str, str]:
    """The example's environment on a fresh database, migrated by ``manage.py migrate``."""
    env = django_example.environment(
        dict(os.environ),
        DATABASE_URL=database_dsn,
        CELERY_BROKER_URL=redis_url,
        INSIGHTS_MODEL_SECONDS=str(MODEL_SECONDS),
        **HEARTBEAT_ENV,
    )
    manage("migrate", env=env)
    return env


@pytest.fixture
def example_workers(tmp_path: Path) -> Iterator[list[processes.ManagedProcess]]:
    started: list[processes.ManagedProcess] = []
    yield started
    for worker in started:
        worker.stop(timeout_seconds=20)


def manage(*args: str, env: dict[str, str]) -> str:
    step = django_example.Step(
        " ".join(["python", "manage.py", *args]), django_example.EXAMPLE_DIR, background=False
    )
    return django_example.run(step, env=env).stdout


def start_worker(
    name: str,
    *,
    env: dict[str, str],
    started: list[processes.ManagedProcess],
    log_dir: Path,
    pool: str = "threads",
    concurrency: int = 1,
) -> processes.ManagedProcess:
    step = django_example.Step(
        f"celery -A mindjourney worker -Q insights -c {concurrency} --pool {pool} "
        f"-n {name}@%h -l INFO",
        django_example.EXAMPLE_DIR,
        background=True,
    )
    worker = django_example.start(
        step, env={**env, "HOSTNAME": name}, name=f"django-{name}", log_dir=log_dir
    )
    started.append(worker)
    return worker


def revisions_by_entry(conn: psycopg.Connection[Any]) -> dict[int, int]:
    rows = conn.execute(
        "SELECT e.id, count(r.id) FROM journal_entry e "
        "LEFT JOIN insights_revision r ON r.entry_id = e.id GROUP BY e.id ORDER BY e.id"
    ).fetchall()
    return {int(entry): int(count) for entry, count in rows}


def test_the_examples_migrations_are_the_ones_its_models_need(example_env: dict[str, str]) -> None:
    manage("makemigrations", "--check", "--dry-run", env=example_env)


def test_a_frozen_django_body_that_lost_its_fence_commits_nothing(
    database_dsn: str,
    redis_url: str,
    example_env: dict[str, str],
    example_workers: list[processes.ManagedProcess],
    tmp_path: Path,
) -> None:
    """SIGSTOP a worker in the middle of entry 1's body (a long GC pause, a partition): it
    cannot heartbeat, the sweep ends its incarnation and entry 1 runs on another worker.
    Then it wakes. Whether its watchdog kills it first or the body reaches
    ``fenced_atomic()`` and finds its fence gone, its ORM writes must not commit.

    The threads pool: Django's connections are per thread, and nothing but the fence and the
    watchdog can stop the woken body there."""
    manage("add_sample_entries", "3", env=example_env)
    policy = make_policy(lease_timeout="60s")
    frozen = start_worker("frozen", env=example_env, started=example_workers, log_dir=tmp_path)
    with (
        psycopg.connect(database_dsn, autocommit=True) as conn,
        Sweeper(policy, dsn=database_dsn, broker_url=redis_url),
    ):
        wait_for(
            lambda: ledger_states(conn).get("1") == "running",
            timeout_seconds=30,
            what="entry 1's body running",
        )
        assert frozen.pid is not None
        os.killpg(frozen.pid, signal.SIGSTOP)
        frozen_at = audit.database_now(conn)
        try:
            start_worker("rescuer", env=example_env, started=example_workers, log_dir=tmp_path)
            wait_for(
                lambda: (
                    set(ledger_states(conn).values()) == {"succeeded"}
                    and len(ledger_states(conn)) == 3
                ),
                timeout_seconds=90,
                what="every entry succeeded after the frozen worker's incarnation ended",
                poll_seconds=0.3,
            )
        finally:
            os.killpg(frozen.pid, signal.SIGCONT)
        woken_at = audit.database_now(conn)
        # The woken body had at most MODEL_SECONDS of its model call left, then its commit.
        wait_for(
            lambda: seconds_since(conn, woken_at) > MODEL_SECONDS + 3,
            timeout_seconds=30,
            what="the woken body to have had its chance to commit",
            poll_seconds=0.3,
        )
        revisions = revisions_by_entry(conn)
        lost = lost_attempts(conn)
        states = ledger_states(conn)
    print(f"frozen at {frozen_at}; lost attempts {lost}; revisions {revisions}")
    assert revisions == {1: 1, 2: 1, 3: 1}, "an effect was committed twice (or never)"
    assert states == {"1": "succeeded", "2": "succeeded", "3": "succeeded"}
    assert any(row[0] == "1" for row in lost), lost


def test_a_django_body_whose_fence_was_taken_rolls_back_its_orm_writes(
    database_dsn: str,
    redis_url: str,
    example_env: dict[str, str],
    example_workers: list[processes.ManagedProcess],
    tmp_path: Path,
) -> None:
    """The race the watchdog cannot close: the entry changes hands while its body runs in a
    healthy worker. Here the test hands it over itself (a new fence token in the ledger, as
    a re-dispatch writes) during the body's model call. ``fenced_atomic()`` must then find
    its fence gone and roll back the ORM writes made inside it, on Django's connection."""
    manage("add_sample_entries", "1", env=example_env)
    policy = make_policy(lease_timeout="60s")
    worker = start_worker("healthy", env=example_env, started=example_workers, log_dir=tmp_path)
    with (
        psycopg.connect(database_dsn, autocommit=True) as conn,
        Sweeper(policy, dsn=database_dsn, broker_url=redis_url),
    ):
        wait_for(
            lambda: ledger_states(conn).get("1") == "running",
            timeout_seconds=30,
            what="entry 1's body running",
        )
        conn.execute(
            "UPDATE celery_reconciler.entries SET fence_token = gen_random_uuid() "
            "WHERE entry_id = '1'"
        )
        wait_for(
            lambda: "lost its fence" in worker.log_path.read_text(errors="replace"),
            timeout_seconds=MODEL_SECONDS + 10,
            what="the body to find its fence gone at its commit",
        )
        entry = conn.execute(
            "SELECT insights_extracted, insights FROM journal_entry WHERE id = 1"
        ).fetchone()
        revisions = revisions_by_entry(conn)
    assert entry == (False, None), "the ORM writes of a fenced-out body were committed"
    assert revisions == {1: 0}
    assert worker.running(), "the worker died instead of ending the task quietly"


def test_prefork_workers_keep_going_through_a_database_restart_between_tasks(
    database_dsn: str,
    redis_url: str,
    postgres: devstack_postgres.PostgresServer,
    example_env: dict[str, str],
    example_workers: list[processes.ManagedProcess],
    tmp_path: Path,
) -> None:
    """Each pool process keeps its Django connection across tasks (``CONN_MAX_AGE``); after
    a PostgreSQL restart those connections are dead. Django's health check before reuse
    (``CONN_HEALTH_CHECKS``, run ahead of the fence check) and a reconnect on a failed
    ledger statement must take every later task through without a failed attempt."""
    env = {**example_env, "INSIGHTS_MODEL_SECONDS": "0.1"}
    manage("add_sample_entries", "10", env=env)
    policy = make_policy(lease_timeout="60s")
    start_worker(
        "steady", env=env, started=example_workers, log_dir=tmp_path, pool="prefork", concurrency=2
    )
    with (
        Sweeper(policy, dsn=database_dsn, broker_url=redis_url),
        psycopg.connect(database_dsn, autocommit=True) as conn,
    ):
        wait_for(
            lambda: list(ledger_states(conn).values()) == ["succeeded"] * 10,
            timeout_seconds=60,
            what="the first 10 entries succeeded",
        )
    postgres.stop()
    postgres.start()
    manage("add_sample_entries", "10", env=env)
    with (
        Sweeper(policy, dsn=database_dsn, broker_url=redis_url),
        psycopg.connect(database_dsn, autocommit=True) as conn,
    ):
        wait_for(
            lambda: list(ledger_states(conn).values()) == ["succeeded"] * 20,
            timeout_seconds=90,
            what="the 10 entries added after the restart succeeded too",
        )
        failed = conn.execute(
            "SELECT count(*) FROM celery_reconciler.attempts WHERE outcome <> 'succeeded'"
        ).fetchone()
        revisions = revisions_by_entry(conn)
    assert failed == (0,)
    assert revisions == {entry: 1 for entry in range(1, 21)}


def sessions_opened(conn: psycopg.Connection[Any]) -> int:
    """Sessions ever opened on this database (a backend's count reaches the view when it
    flushes its statistics: at the latest when it ends)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_pool_process_keeps_its_django_connection_between_tasks(
    database_dsn: str,
    redis_url: str,
    example_env: dict[str, str],
    example_workers: list[processes.ManagedProcess],
    tmp_path: Path,
) -> None:
    """The example's settings keep a connection between tasks (``CONN_MAX_AGE``, checked
    before reuse by ``CONN_HEALTH_CHECKS``), so the fence check and the body cost no new
    connection. Celery 5.6 and later close every Django connection before and after each
    task whatever ``CONN_MAX_AGE`` says: each task then opened a session of its own (the
    worker benchmark's no-op ``fenced_atomic`` task took 54-97 ms)."""
    env = {**example_env, "INSIGHTS_MODEL_SECONDS": "0"}
    policy = make_policy(lease_timeout="60s")
    start_worker(
        "keeper", env=env, started=example_workers, log_dir=tmp_path, pool="prefork", concurrency=1
    )
    entries = 20
    with (
        Sweeper(policy, dsn=database_dsn, broker_url=redis_url),
        psycopg.connect(database_dsn, autocommit=True) as conn,
    ):
        manage("add_sample_entries", "2", env=env)
        wait_for(
            lambda: list(ledger_states(conn).values()) == ["succeeded"] * 2,
            timeout_seconds=60,
            what="two entries succeeded (the pool process has its connection)",
        )
        before = sessions_opened(conn)
        manage("add_sample_entries", str(entries), env=env)
        wait_for(
            lambda: list(ledger_states(conn).values()) == ["succeeded"] * (entries + 2),
            timeout_seconds=90,
            what=f"the {entries} entries added next succeeded",
        )
        opened = sessions_opened(conn) - before
    # manage.py's own session, and a reconnect or two at most: not one a task.
    assert opened < entries // 2, f"{opened} sessions opened for {entries} tasks"
