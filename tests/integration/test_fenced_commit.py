"""``fenced_transaction`` against a real PostgreSQL: the body's writes and the done mark
commit together or not at all, and the mark and the COMMIT cost one round trip.

The attempt is started through the ledger as a worker starts it; the body runs on a
connection of its own, as a user's body does. Round trips are counted from libpq's own
trace of the session (one ReadyForQuery per round trip), never timed.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from celery_app.demo import schema
from celery_reconciler import ledger, policy
from celery_reconciler_worker import reliable, task


@pytest.fixture
def body_conn(demo_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(demo_dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS fenced_effects (entry_id text)")
        yield connection


def started_attempt(conn: psycopg.Connection[Any], entry_id: str) -> ledger.RunningAttempt:
    """Claim ``entry_id`` under policy t/p and start it, as a worker does."""
    ledger.ensure_schema(conn)
    # The policy's rules, as every sweep publishes them (its survey's first part).
    ledger.survey(
        conn,
        policy.parse_policy(schema.policy_spec(), namespace="t", name="p"),
        stranded_seconds=0.0,
    )
    with conn.transaction():
        (claimed,) = ledger.claim(
            conn,
            policy_key="t/p",
            entry_ids=[entry_id],
            lease_seconds=60,
            still_pending=lambda candidates: set(candidates),
        )
    incarnation = ledger.register_incarnation(
        conn,
        identity=ledger.WorkerIdentity(hostname="test", pid=1),
        heartbeat_timeout_seconds=20,
    )
    attempt = ledger.start_attempt(
        conn,
        fence_token=str(claimed.fence_token),
        entry_id=entry_id,
        worker="test",
        incarnation=incarnation,
        heartbeat_timeout_seconds=20,
    )
    assert attempt is not None
    return attempt


def in_a_delivery(attempt: ledger.RunningAttempt) -> task._CurrentAttempt:
    """What ``ReconciledTask`` sets up before the body: the attempt the body runs."""
    current = task._CurrentAttempt(attempt)
    task._current_attempt.set(current)
    return current


def effects(conn: psycopg.Connection[Any]) -> list[str]:
    return [row[0] for row in conn.execute("SELECT entry_id FROM fenced_effects ORDER BY 1")]


def state_of(conn: psycopg.Connection[Any], entry_id: str) -> str:
    row = conn.execute(
        "SELECT state FROM celery_reconciler.entries WHERE policy_key = 't/p' AND entry_id = %s",
        [entry_id],
    ).fetchone()
    assert row is not None
    return str(row[0])


def test_the_writes_and_the_done_mark_commit_together_in_three_round_trips(
    conn: psycopg.Connection[Any], body_conn: psycopg.Connection[Any]
) -> None:
    """BEGIN, the body's one statement, then the done mark with the COMMIT: three round
    trips (four when the mark waited for its answer before the COMMIT was sent)."""
    current = in_a_delivery(started_attempt(conn, "1"))
    with tempfile.TemporaryFile() as trace:
        body_conn.pgconn.trace(trace.fileno())
        body_conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        with reliable.fenced_transaction(body_conn):
            body_conn.execute("INSERT INTO fenced_effects VALUES ('1')")
        body_conn.pgconn.untrace()
        trace.seek(0)
        round_trips = sum(
            1 for line in trace.read().decode().splitlines() if "\tReadyForQuery" in line
        )
    assert round_trips == 3
    assert current.recorded
    assert effects(conn) == ["1"]
    assert state_of(conn, "1") == "succeeded"


def test_a_lost_fence_rolls_the_writes_back_and_leaves_the_connection_usable(
    conn: psycopg.Connection[Any], body_conn: psycopg.Connection[Any]
) -> None:
    attempt = started_attempt(conn, "2")
    current = in_a_delivery(attempt)
    # The operator handed the entry to another attempt meanwhile.
    conn.execute(
        "UPDATE celery_reconciler.entries SET fence_token = %s, state = 'queued' "
        "WHERE policy_key = 't/p' AND entry_id = '2'",
        [uuid.uuid4()],
    )
    with pytest.raises(reliable.FenceLost), reliable.fenced_transaction(body_conn):
        body_conn.execute("INSERT INTO fenced_effects VALUES ('2')")
    assert not current.recorded
    assert effects(conn) == []
    assert state_of(conn, "2") == "queued"
    assert body_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert body_conn.execute("SELECT 1").fetchone() == (1,)


def test_the_bodys_own_failure_is_its_own_not_a_lost_fence(
    conn: psycopg.Connection[Any], body_conn: psycopg.Connection[Any]
) -> None:
    """A body statement failing with the error a lost fence's mark raises is the body's."""
    in_a_delivery(started_attempt(conn, "3"))
    with (
        pytest.raises(psycopg.errors.InvalidTextRepresentation),
        reliable.fenced_transaction(body_conn),
    ):
        body_conn.execute("INSERT INTO fenced_effects VALUES ('3')")
        body_conn.execute("SELECT 'not a number'::int")
    assert effects(conn) == []
    assert state_of(conn, "3") == "running"
