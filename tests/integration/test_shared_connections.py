"""The operator's shared connections against a real PostgreSQL: bounded, reused, reserved
for rescues, and a full server reported as what it is."""

from __future__ import annotations

import threading
import urllib.parse
import uuid

import psycopg
import pytest
from psycopg import sql

from celery_reconciler import conditions, ledger, pools
from celery_reconciler.loop import problems


def operator_connections(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'celery-reconciler%%' "
            "GROUP BY 1"
        ).fetchall()
    return {str(name): int(count) for name, count in rows}


def test_policies_of_one_dsn_share_connections_within_the_bound(database_dsn: str) -> None:
    pools.configure(max_connections=5)
    shared = [pools.attach(database_dsn) for _ in range(50)]
    try:
        assert all(one is shared[0] for one in shared)
        release = threading.Event()
        inside = threading.Barrier(5)

        def sweep() -> None:
            with shared[0].sweeps.session(doing="sweeping") as conn:
                conn.execute("SELECT 1")
                inside.wait(timeout=30)
                release.wait(timeout=30)

        # Four sweeps hold every sweep slot; the rescue reserve still answers at once.
        sweepers = [threading.Thread(target=sweep) for _ in range(4)]
        for thread in sweepers:
            thread.start()
        inside.wait(timeout=30)
        with shared[0].rescues.session(doing="rescuing") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert operator_connections(database_dsn) == {
            pools.SWEEP_APPLICATION_NAME: 4,
            pools.RESCUE_APPLICATION_NAME: 1,
        }
        release.set()
        for thread in sweepers:
            thread.join()

        # Fifty borrowers one after another reuse those connections.
        for one in shared:
            with one.sweeps.session(doing="reading") as conn:
                conn.execute("SELECT 1")
        assert operator_connections(database_dsn)[pools.SWEEP_APPLICATION_NAME] == 4
    finally:
        for one in shared:
            pools.detach(one)
        pools.configure(max_connections=pools.DEFAULT_MAX_CONNECTIONS)
    assert operator_connections(database_dsn) == {}


def test_a_connection_left_inside_a_transaction_is_closed_not_lent(database_dsn: str) -> None:
    pools.configure(max_connections=2)
    shared = pools.attach(database_dsn)
    try:
        with shared.sweeps.session(doing="x") as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT set_config('application_name', 'tainted', false)")
            first = conn.info.backend_pid
        with shared.sweeps.session(doing="y") as conn:
            assert conn.info.backend_pid != first
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        pools.detach(shared)
        pools.configure(max_connections=pools.DEFAULT_MAX_CONNECTIONS)


def test_a_policy_that_waits_too_long_for_a_slot_is_told_why(
    database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pools, "WAIT_SECONDS", 0.2)
    pools.configure(max_connections=2)
    shared = pools.attach(database_dsn)
    try:
        with (
            shared.sweeps.session(doing="a long sweep"),
            pytest.raises(pools.PoolExhausted) as caught,
            shared.sweeps.session(doing="reading status counts"),
        ):
            pass
        problem = problems.problem_of(caught.value)
        assert problem.reason == conditions.CONNECTION_POOL_EXHAUSTED
        assert "reading status counts" in problem.message
        assert "CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS" in problem.message
        password = urllib.parse.urlsplit(database_dsn).password
        assert password and password not in problem.message
    finally:
        pools.detach(shared)
        pools.configure(max_connections=pools.DEFAULT_MAX_CONNECTIONS)


def test_a_full_server_is_too_many_connections_not_a_wrong_dsn(database_dsn: str) -> None:
    """PostgreSQL's own refusal (SQLSTATE 53300), here from a role's connection limit."""
    parts = urllib.parse.urlsplit(database_dsn)
    role = f"one_slot_{uuid.uuid4().hex[:8]}"  # roles are the server's, not the database's
    with psycopg.connect(database_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'one-slot-pw' CONNECTION LIMIT 1").format(
                sql.Identifier(role)
            )
        )
        admin.execute(
            sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(
                sql.Identifier(parts.path.lstrip("/")), sql.Identifier(role)
            )
        )
    limited = parts._replace(netloc=f"{role}:one-slot-pw@{parts.hostname}:{parts.port}").geturl()
    with psycopg.connect(limited, autocommit=True):
        pools.configure(max_connections=2)
        shared = pools.attach(limited)
        try:
            with (
                pytest.raises(ledger.TooManyConnections) as caught,
                shared.sweeps.session(doing="sweeping"),
            ):
                pass
        finally:
            pools.detach(shared)
            pools.configure(max_connections=pools.DEFAULT_MAX_CONNECTIONS)
    problem = problems.problem_of(caught.value)
    assert problem.reason == conditions.TOO_MANY_CONNECTIONS
    assert "max_connections" in problem.message
    assert "one-slot-pw" not in problem.message
    assert "DSN (" not in problem.message
