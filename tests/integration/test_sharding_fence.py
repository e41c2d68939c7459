"""The ledger's fence for active-active replicas, against real PostgreSQL and Redis: a sweep
under an older fencing token is refused, a takeover waits for the previous owner's claim
transaction, and the sweep intervals of two owners never overlap."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from reconcile_support import make_policy

from celery_app.demo import schema
from celery_reconciler import broker, ledger, reconcile, sharding


def intervals(conn: psycopg.Connection[Any], policy_key: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT holder, token, started_at, finished_at, ended FROM celery_reconciler.sweeps "
        "WHERE policy_key = %s ORDER BY started_at",
        [policy_key],
    ).fetchall()


def test_a_replica_that_lost_the_policy_is_refused_by_the_ledger(
    demo_dsn: str, redis_url: str, conn: psycopg.Connection[Any]
) -> None:
    schema.seed(conn, count=30)
    policy = make_policy(limits={"batchSize": 10, "maxInFlight": 10})
    first = sharding.Fence(policy.key, "replica-a/1", 3)
    second = sharding.Fence(policy.key, "replica-b/1", 4)
    db = reconcile.Database(demo_dsn)
    publisher = broker.connect(redis_url)
    try:
        swept = reconcile.reconcile_once(policy, db=db, broker=publisher, fence=first)
        assert swept.published == 10
        taken = reconcile.reconcile_once(
            policy, db=db, broker=publisher, fence=second, hold_dispatch=True
        )
        assert taken.published == 0
        with pytest.raises(ledger.FencedOut) as refused:
            reconcile.reconcile_once(policy, db=db, broker=publisher, fence=first)
        assert refused.value.current == second
        assert "replica-b/1 (token 4)" in str(refused.value)
    finally:
        db.close()
        publisher.close()
    rows = intervals(conn, policy.key)
    assert [(holder, token, ended) for holder, token, _, _, ended in rows] == [
        ("replica-a/1", 3, "finished"),
        ("replica-b/1", 4, "finished"),
    ]
    claimed = conn.execute(
        "SELECT count(*) FROM celery_reconciler.entries WHERE policy_key = %s", [policy.key]
    ).fetchone()
    assert claimed == (10,)  # the refused sweep claimed nothing


def test_a_takeover_waits_for_the_previous_owners_claim_and_closes_its_interval(
    demo_dsn: str, conn: psycopg.Connection[Any]
) -> None:
    policy = make_policy()
    old = sharding.Fence(policy.key, "replica-a/1", 1)
    new = sharding.Fence(policy.key, "replica-b/1", 2)
    with psycopg.connect(demo_dsn, autocommit=True) as old_conn:
        ledger.ensure_schema(old_conn)
        ledger.begin_sweep(old_conn, old)
        taken = threading.Event()

        def take_over() -> None:
            with psycopg.connect(demo_dsn, autocommit=True) as new_conn:
                ledger.begin_sweep(new_conn, new)
            taken.set()

        with old_conn.transaction():
            ledger.check_fence(old_conn, old)  # a claim transaction in progress
            thief = threading.Thread(target=take_over)
            thief.start()
            # The takeover must queue behind the share lock, not pass it.
            assert not taken.wait(timeout=1.0)
            old_commit = old_conn.execute("SELECT clock_timestamp()").fetchone()
        thief.join(timeout=30)
        assert taken.is_set()
        with pytest.raises(ledger.FencedOut), old_conn.transaction():
            ledger.check_fence(old_conn, old)
    assert old_commit is not None
    (a_holder, _, a_start, a_end, a_ended), (b_holder, _, b_start, b_end, _) = intervals(
        conn, policy.key
    )
    assert (a_holder, a_ended, b_holder, b_end) == (
        "replica-a/1",
        "taken_over",
        "replica-b/1",
        None,
    )
    assert a_start < old_commit[0] < a_end <= b_start


def test_the_same_token_under_another_holder_is_refused(
    demo_dsn: str, conn: psycopg.Connection[Any]
) -> None:
    policy = make_policy()
    with psycopg.connect(demo_dsn, autocommit=True) as c:
        ledger.ensure_schema(c)
        ledger.begin_sweep(c, sharding.Fence(policy.key, "replica-a/1", 7))
        with pytest.raises(ledger.FencedOut):
            ledger.begin_sweep(c, sharding.Fence(policy.key, "replica-b/1", 7))
        ledger.begin_sweep(c, sharding.Fence(policy.key, "replica-a/1", 7))  # the owner goes on
    assert [row[0] for row in intervals(conn, policy.key)] == ["replica-a/1", "replica-a/1"]


def test_the_owner_row_of_a_deleted_policy_goes_with_it_and_a_recreated_one_keeps_its_own(
    demo_dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """Issue 22: an owner row with a token no Lease of a new policy would reach (forged, or
    left by a policy of the same name) outlived its policy, and the new policy of that name
    was never swept. Removing a deleted policy's record removes its owner row too — unless
    the name's work is already recorded by another uid (a recreated policy's own row)."""
    ledger.ensure_schema(conn)
    policy = make_policy()
    db = reconcile.Database(demo_dsn)
    try:
        ledger.begin_sweep(conn, sharding.Fence(policy.key, "replica-a/1", 2**62))
        conn.execute(
            "INSERT INTO celery_reconciler.policy_work (policy_key, policy_uid, created, "
            "table_name, pending, task_name) VALUES (%s, 'uid-old', 't', 'journal_entry', "
            "'p', 'x')",
            [policy.key],
        )
        reconcile.forget_work(db, policy_key=policy.key, policy_uid="uid-old")
        # The recreated policy's first Lease starts over at a small token.
        ledger.begin_sweep(conn, sharding.Fence(policy.key, "replica-b/1", 1))

        # A late removal for the old uid leaves the recreated policy's owner row alone.
        conn.execute(
            "INSERT INTO celery_reconciler.policy_work (policy_key, policy_uid, created, "
            "table_name, pending, task_name) VALUES (%s, 'uid-new', 't', 'journal_entry', "
            "'p', 'x')",
            [policy.key],
        )
        reconcile.forget_work(db, policy_key=policy.key, policy_uid="uid-old")
        owner = conn.execute(
            "SELECT holder, token FROM celery_reconciler.policy_owners WHERE policy_key = %s",
            [policy.key],
        ).fetchone()
        assert owner == ("replica-b/1", 1)
    finally:
        db.close()
