"""Hostile and mistaken specs against the real PostgreSQL and Redis: every failure a sweep
can meet is a known error with a condition reason and a message naming the field to fix,
never a raw database error; no text read from a Secret is ever quoted; and once the spec is
fixed, the very next sweep dispatches.

The operator's loop turns these errors into conditions with ``loop.problems.problem_of`` (so do the
CLI's messages); the e2e tests check the same cases through the running operator.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql
from reconcile_support import make_policy, sweep_connections

from celery_app.demo import schema
from celery_reconciler import broker, conditions, ledger, planning, reconcile, source
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import problems
from devstack import postgres as devstack_postgres

pytestmark = pytest.mark.integration


def policy_with(**source: Any) -> policy_module.Policy:
    spec = schema.policy_spec()
    spec["source"] = {**spec["source"], **source}
    return policy_module.parse_policy(spec, namespace="test", name="hostile")


# (case, source fields, reason, the field the message must name)
HOSTILE_SOURCES = [
    (
        "text = boolean",
        {"pending": {"column": "body", "equals": True}},
        conditions.SOURCE_INVALID,
        "spec.source.pending.equals",
    ),
    (
        "boolean = integer",
        {"pending": {"column": "insights_extracted", "equals": 1}},
        conditions.SOURCE_INVALID,
        "spec.source.pending.equals",
    ),
    (
        "not a timestamp",
        {"pending": {"column": "created_at", "equals": "not-a-date"}},
        conditions.SOURCE_INVALID,
        "spec.source.pending.equals",
    ),
    (
        "not a boolean in a list",
        {"pending": {"column": "insights_extracted", "in": ["maybe", "perhaps"]}},
        conditions.SOURCE_INVALID,
        "spec.source.pending.in",
    ),
    (
        "NUL byte",
        {"pending": {"column": "body", "equals": "a\x00b"}},
        conditions.SOURCE_INVALID,
        "spec.source.pending.equals",
    ),
    (
        "orderBy a json column",
        {"orderBy": "raw"},
        conditions.SOURCE_INVALID,
        "spec.source.orderBy",
    ),
    (
        "missing pending column",
        {"pending": {"column": "insights_extractd", "equals": False}},
        conditions.SOURCE_INVALID,
        "spec.source.pending.column",
    ),
    (
        "missing orderBy column",
        {"orderBy": "created"},
        conditions.SOURCE_INVALID,
        "spec.source.orderBy",
    ),
]


@pytest.mark.parametrize(
    ("source", "reason", "field"),
    [case[1:] for case in HOSTILE_SOURCES],
    ids=[case[0] for case in HOSTILE_SOURCES],
)
def test_a_hostile_source_is_a_condition_naming_the_field_and_the_fix_sweeps_at_once(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    source: dict[str, Any],
    reason: str,
    field: str,
) -> None:
    conn.execute("ALTER TABLE journal_entry ADD COLUMN raw json")
    schema.seed(conn, count=4)
    hostile = policy_with(**source)
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        with pytest.raises(reconcile.SourceInvalid) as caught:
            reconcile.reconcile_once(hostile, db=db, broker=publisher)
        problem = problems.problem_of(caught.value)
        assert problem.reason == reason
        assert field in problem.message
        # The same Database and Publisher, the spec fixed: the next sweep dispatches.
        assert reconcile.reconcile_once(policy_with(), db=db, broker=publisher).published == 4


def test_a_database_user_without_rights_on_the_ledger_schema_is_told_what_to_grant(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    postgres: devstack_postgres.PostgresServer,
    redis_url: str,
) -> None:
    schema.seed(conn, count=3)
    password = "limited-user-pw-8271"
    conn.execute(sql.SQL("CREATE ROLE limited LOGIN PASSWORD {}").format(sql.Literal(password)))
    conn.execute("GRANT SELECT ON journal_entry TO limited")
    database = conn.info.dbname
    conn.execute(
        sql.SQL("REVOKE CREATE ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database))
    )
    limited_dsn = f"postgresql://limited:{password}@127.0.0.1:{postgres.port}/{database}"
    policy = make_policy()
    with sweep_connections(limited_dsn, redis_url) as (db, publisher):
        with pytest.raises(reconcile.LedgerPermissionDenied) as caught:
            reconcile.reconcile_once(policy, db=db, broker=publisher)
        problem = problems.problem_of(caught.value)
        assert problem.reason == conditions.LEDGER_PERMISSION_DENIED
        assert "GRANT CONNECT, CREATE ON DATABASE" in problem.message
        assert "celery-reconciler grants" in problem.message
        assert "spec.source.databaseSecretRef" in problem.message
        assert password not in problem.message and limited_dsn not in problem.message

        # The schema exists (another user made it) but this user may not use it.
        with sweep_connections(demo_dsn, redis_url) as (owner, _):
            reconcile.reconcile_once(policy, db=owner, broker=publisher)
        conn.execute("DELETE FROM celery_reconciler.entries")
        with pytest.raises(reconcile.LedgerPermissionDenied):
            reconcile.reconcile_once(policy, db=db, broker=publisher)

        conn.execute(f"GRANT USAGE, CREATE ON SCHEMA {ledger.SCHEMA} TO limited")
        conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {ledger.SCHEMA} "
            "TO limited"
        )
        assert reconcile.reconcile_once(policy, db=db, broker=publisher).published == 3


# Values a Secret's key might hold that are not DSNs; each word must stay out of messages.
NOT_A_DSN = [
    "s3cretword-one and-another-word",
    "hunter2hunter2",
    "mysecretkey=itsvalue",
    "host=127.0.0.1 port=s3cretport",
    "postgresql://user:pw@127.0.0.1:notaport/db",
]


@pytest.mark.parametrize("value", NOT_A_DSN)
def test_a_secret_value_that_is_not_a_dsn_is_never_quoted(value: str, redis_url: str) -> None:
    policy = make_policy()
    db = reconcile.Database(value)
    publisher = broker.connect(redis_url)
    try:
        with pytest.raises(reconcile.DatabaseUnavailable) as caught:
            reconcile.reconcile_once(policy, db=db, broker=publisher)
    finally:
        publisher.close()
    shown = problems.problem_of(caught.value).message + repr(db)
    for word in value.replace("=", " ").replace(":", " ").replace("/", " ").split():
        if len(word) >= 3 and word not in ("host", "port", "127.0.0.1", "postgresql", "user"):
            assert word not in shown


@pytest.mark.parametrize(
    "url",
    ["redis://:pw@127.0.0.1:s3cretport/0", "s3cretword not a url", "redis://[s3cret/0"],
)
def test_a_broker_url_that_does_not_parse_is_never_quoted(url: str) -> None:
    with pytest.raises(broker.BrokerUrlInvalid) as caught:
        broker.connect(url)
    problem = problems.problem_of(caught.value)
    assert problem.reason == conditions.SECRET_INVALID
    assert "s3cret" not in problem.message


def test_a_tiny_dispatch_rate_ends_the_sweep_instead_of_sleeping_forever(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str
) -> None:
    schema.seed(conn, count=5)
    policy = make_policy(limits={"batchSize": 500, "maxInFlight": 10000, "dispatchPerSecond": 0.01})
    slept: list[float] = []
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        result = reconcile.reconcile_once(policy, db=db, broker=publisher, sleep=slept.append)
    assert result.published == 1
    assert slept == []
    assert result.rate_allows_in_seconds is not None
    assert result.rate_allows_in_seconds > planning.MAX_DISPATCH_PAUSE_SECONDS


def test_operator_sessions_have_statement_and_lock_timeouts_and_workers_do_not(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str
) -> None:
    schema.seed(conn, count=2)
    policy = make_policy()
    db = reconcile.Database(demo_dsn)
    try:
        session = db.connection()
        assert session.execute("SHOW statement_timeout").fetchone() == ("1min",)
        assert session.execute("SHOW lock_timeout").fetchone() == ("30s",)
        # Source reads share the ledger's connection: keepalives cover them too.
        assert session.info.get_parameters().get("keepalives") == "1"
    finally:
        db.close()
    with ledger.connect(demo_dsn, application_name="celery-worker test") as worker_session:
        assert worker_session.execute("SHOW statement_timeout").fetchone() == ("0",)

    # A lock held elsewhere fails the sweep after lock_timeout: a condition and a retry,
    # not a loop stuck in a thread.
    with sweep_connections(demo_dsn, redis_url) as (first, publisher):
        reconcile.reconcile_once(policy, db=first, broker=publisher)
    holder = psycopg.connect(demo_dsn)
    try:
        holder.execute("LOCK TABLE celery_reconciler.policies IN ACCESS EXCLUSIVE MODE")
        db = reconcile.Database(demo_dsn, lock_timeout_seconds=1)
        with (
            sweep_connections(demo_dsn, redis_url) as (_, publisher),
            pytest.raises(reconcile.DatabaseUnavailable) as caught,
        ):
            reconcile.reconcile_once(policy, db=db, broker=publisher)
        db.close()
        assert "lock timeout" in str(caught.value)
        assert problems.problem_of(caught.value).reason == conditions.DATABASE_UNAVAILABLE
    finally:
        holder.rollback()
        holder.close()


def test_percent_signs_in_pending_values_are_data_not_placeholders(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str
) -> None:
    """A rendered query is executed with parameters, and psycopg reads every ``%`` of its
    text as a placeholder — inside quoted literals too — unless it is doubled."""
    conn.execute(
        "CREATE TABLE coupon (id bigint PRIMARY KEY, state text NOT NULL, "
        "at timestamptz NOT NULL DEFAULT now())"
    )
    conn.execute(
        """INSERT INTO coupon SELECT n, CASE n % 3 WHEN 0 THEN '50%s off' WHEN 1 THEN '%b'
        ELSE 'done%' END FROM generate_series(1, 12) AS n"""
    )
    spec = schema.policy_spec()
    spec["source"] = {
        **spec["source"],
        "table": "public.coupon",
        "pending": {"column": "state", "in": ["50%s off", "%b", "100%"]},
        "orderBy": "at",
    }
    percent = policy_module.parse_policy(spec, namespace="test", name="percent")
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        assert reconcile.reconcile_once(percent, db=db, broker=publisher).published == 8
    assert source.pending_summary(conn, percent.source).count == 8
    assert source.filter_pending(conn, percent.source, ["1", "2", "3"]) == {"1", "3"}
    conn.execute("INSERT INTO coupon SELECT n, 'done' FROM generate_series(13, 20000) AS n")
    conn.execute("ANALYZE coupon")
    advice = source.index_advice(conn, percent.source, page_size=500)
    assert advice is not None
    assert "'50%s off', '%b', '100%'" in advice.create_index  # as a person would type it
