"""The ledger's least-privilege roles, with exactly the GRANTs ``celery-reconciler grants``
prints: a real worker and the operator's sweeps do their work with them, and a worker's
login is refused everything else (issue 22, item 2).

Roles are created as PostgreSQL roles of the session's server with random names (roles are
cluster-wide); the demo body's own table rights are the application's business, granted
apart from the ledger's.
"""

from __future__ import annotations

import io
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql
from reconcile_support import (
    WorkerFactory,
    make_policy,
    pending_count,
    sweep_connections,
    sweep_until,
)

from celery_app.demo import audit, schema
from celery_reconciler import cli, ledger_roles, reconcile
from celery_reconciler import ledger as operator_ledger
from celery_reconciler_worker import connection as worker_connection
from devstack import postgres as devstack_postgres
from tests.e2e.hostile_corpus import LEDGER_CASES

pytestmark = pytest.mark.integration


@pytest.fixture
def logins(postgres: devstack_postgres.PostgresServer, demo_dsn: str) -> Iterator[dict[str, str]]:
    """A LOGIN role per part (operator, worker, reader) with a password; their DSNs."""
    suffix = uuid.uuid4().hex[:8]
    dsns: dict[str, str] = {}
    names: list[str] = []
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        for part in ("operator", "worker", "reader"):
            role, password = f"cr_{part}_{suffix}", secrets.token_urlsafe(12)
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
            names.append(role)
            dsns[part] = conninfo.make_conninfo(demo_dsn, user=role, password=password)
            dsns[f"{part}_role"] = role
    yield dsns
    with psycopg.connect(demo_dsn, autocommit=True) as admin:
        for role in names:
            admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        for role in names:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def printed_grants(*, database: str, logins: dict[str, str]) -> tuple[str, str]:
    out = io.StringIO()
    code = cli.main(
        [
            "grants",
            "--database",
            database,
            "--table",
            "public.journal_entry",
            "--operator-role",
            logins["operator_role"],
            "--worker-role",
            logins["worker_role"],
            "--reader-role",
            logins["reader_role"],
        ],
        out=out,
    )
    assert code == cli.EXIT_OK
    administrator, operator = out.getvalue().split(ledger_roles.OPERATOR_PART_MARKER)
    return administrator, ledger_roles.OPERATOR_PART_MARKER + operator


def run_script(dsn: str, script: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(script.encode())


def ledger_states(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT state, count(*) FROM celery_reconciler.entries GROUP BY state")
    return dict(rows.fetchall())


def refused(dsn: str, statement: str) -> bool:
    """Whether the server refuses ``statement`` to this login for want of a right."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(statement.encode())
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


def test_a_worker_and_the_operator_run_with_the_printed_grants_and_a_worker_may_do_no_more(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
    logins: dict[str, str],
) -> None:
    database = str(conninfo.conninfo_to_dict(demo_dsn)["dbname"])
    administrator, operator = printed_grants(database=database, logins=logins)
    run_script(demo_dsn, administrator)
    # The demo body's own rights on its tables: the application's, not the ledger's.
    conn.execute(
        sql.SQL(
            "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}; "
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        ).format(role=sql.Identifier(logins["worker_role"]))
    )
    schema.seed(conn, count=40)
    schema.set_fault(conn, entry_id=7, kind="fail")
    policy = make_policy(retry={"maxAttempts": 1, "initialDelay": "1s"})

    # The operator's first sweep creates the schema it then owns; its part of the grants
    # names the functions that sweep created.
    with sweep_connections(logins["operator"], redis_url) as (db, publisher):
        first = reconcile.reconcile_once(policy, db=db, broker=publisher)
    assert first.published == 40
    run_script(logins["operator"], operator)
    owner = conn.execute(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s",
        [operator_ledger.SCHEMA],
    ).fetchone()
    assert owner == (logins["operator_role"],)

    start_worker(broker_url=redis_url, dsn=logins["worker"], concurrency=2)
    sweep_until(
        lambda: pending_count(conn) == 1 and ledger_states(conn) == {"succeeded": 39, "dead": 1},
        policy_=policy,
        dsn=logins["operator"],
        broker_url=redis_url,
        timeout_seconds=120,
    )
    runs = audit.runs(conn)
    assert sorted(int(run.entry_id) for run in runs) == list(range(1, 41))
    assert audit.overlapping_runs(runs) == []
    live = conn.execute(
        "SELECT count(*) FROM celery_reconciler.incarnations WHERE ended_at IS NULL"
    ).fetchone()
    assert live is not None and live[0] >= 1

    worker = logins["worker"]
    for case in LEDGER_CASES:  # the hostile corpus's ledger class
        assert refused(logins[case.login], case.statement), case.name
    # Its functions act only on what the caller proves it holds: ids nobody gave it end
    # nothing and mark nothing.
    with psycopg.connect(worker, autocommit=True) as login:
        ended = login.execute(
            "SELECT celery_reconciler.worker_end_incarnations(%s::uuid[], 'forged')",
            [[uuid.uuid4(), uuid.uuid4()]],
        ).fetchone()
        marked = login.execute(
            "SELECT celery_reconciler.worker_record_failure(%s, 'forged', NULL)", [uuid.uuid4()]
        ).fetchone()
    assert ended == (0,) and marked == (None,)
    assert (
        conn.execute(
            "SELECT count(*) FROM celery_reconciler.incarnations WHERE ended_at IS NULL"
        ).fetchone()
        == live
    )
    assert ledger_states(conn) == {"succeeded": 39, "dead": 1}

    reader = logins["reader"]
    with psycopg.connect(reader, autocommit=True) as login:
        backlog = login.execute(
            "SELECT policy_key, queued, running FROM celery_reconciler.backlog"
        ).fetchall()
    assert backlog == [(policy.key, 0, 0)]


def test_a_worker_login_without_the_functions_grants_is_told_what_to_run(
    demo_dsn: str, logins: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part 2 of the grants not run yet (or a login of another role): a delivery goes back
    to the queue, as when the database is away, and the error says what to grant — not a
    failed task whose permission error nobody reads, nor "check that the database is up"."""
    database = str(conninfo.conninfo_to_dict(demo_dsn)["dbname"])
    administrator, _ = printed_grants(database=database, logins=logins)
    run_script(demo_dsn, administrator)
    with psycopg.connect(logins["operator"], autocommit=True) as owner:
        operator_ledger.ensure_schema(owner)
    monkeypatch.setenv(worker_connection.DSN_ENVIRONMENT_VARIABLE, logins["worker"])
    own = worker_connection._LedgerConnection()
    previous = worker_connection.current()
    worker_connection.use_ledger_connection(own)
    try:
        with pytest.raises(worker_connection.LedgerUnavailable) as caught:
            worker_connection.ledger_call(
                "checking the fence token",
                operator_ledger.start_attempt,
                fence_token=str(uuid.uuid4()),
                entry_id="1",
                worker="w",
            )
    finally:
        worker_connection.use_ledger_connection(previous)
        own.failed()
    message = str(caught.value)
    assert "celery-reconciler grants" in message
    assert "password" not in message.lower() and logins["worker"] not in message
