"""Claim-then-publish and fencing, proven with real PostgreSQL, Redis and celery workers.

Every count comes from the database: ``task_runs`` (one row per body run, written by the
body itself) and the ledger.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
import redis
from reconcile_support import (
    WorkerFactory,
    make_policy,
    pending_count,
    sweep_connections,
    sweep_until,
    wait_for,
)

from celery_app.demo import audit, schema
from celery_reconciler import broker, ledger, reconcile

pytestmark = pytest.mark.integration


def test_two_workers_process_2000_entries_exactly_once(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=2000)
    policy = make_policy(lease_timeout="60s", limits={"batchSize": 500, "maxInFlight": 10000})
    for _ in range(2):
        start_worker(broker_url=broker_url, dsn=demo_dsn, concurrency=2, lease_seconds=60)

    results = sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=180,
        interval_seconds=1.0,
    )

    assert results[0].published == 2000  # one sweep dispatched the whole backlog
    assert sum(result.published for result in results) == 2000  # and nothing twice
    all_runs = audit.runs(conn)
    assert len(all_runs) == 2000
    assert len({run.entry_id for run in all_runs}) == 2000
    assert {run.outcome for run in all_runs} == {"succeeded"}
    assert len({run.worker for run in all_runs}) == 2  # both workers took part
    assert audit.overlapping_runs(all_runs) == []
    states = dict(
        conn.execute("SELECT state, count(*) FROM celery_reconciler.entries GROUP BY state")
    )
    assert states == {"succeeded": 2000}
    row = conn.execute(
        "SELECT count(*) FROM journal_entry WHERE insights ? 'mood' AND insights_extracted"
    ).fetchone()
    assert row == (2000,)


class SimulatedCrash(BaseException):
    """The operator process dying right after the claim committed (not an Exception, so
    nothing in reconcile may catch and 'handle' it)."""


def crash(_messages: Sequence[broker.TaskMessage]) -> None:
    raise SimulatedCrash()


def test_crash_between_claim_and_publish_is_recovered_once_the_message_is_missed(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=50)
    policy = make_policy(lease_timeout="3s")
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        with pytest.raises(SimulatedCrash):
            reconcile.reconcile_once(policy, db=db, broker=publisher, publish=crash)
        # The claim committed, nothing was published.
        assert publisher.queue_depth("insights") == 0
        counts = ledger.counts(conn, policy_key=policy.key)
        assert counts.queued == 50
        # Right after the claim (the messages may still be on their way), a new sweep must
        # not dispatch them a second time.
        again = reconcile.reconcile_once(policy, db=db, broker=publisher)
        assert again.published == 0 and again.in_flight_before == 50

    start_worker(broker_url=broker_url, dsn=demo_dsn, lease_seconds=3)
    results = sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=60,
    )
    recovered = next(result for result in results if result.published)
    assert recovered.published == 50
    # Recovered as lost messages, with no attempt charged: queued for longer than
    # STRANDED_DELIVERY_SECONDS with no message in the broker (the lease is the backstop).
    assert recovered.missing_messages + recovered.expired.unstarted == 50
    all_runs = audit.runs(conn)
    assert len(all_runs) == 50 and len({run.entry_id for run in all_runs}) == 50
    attempts = dict(conn.execute("SELECT entry_id, attempt FROM celery_reconciler.entries"))
    assert set(attempts.values()) == {1}


def test_stale_redeliveries_never_run_the_body(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    schema.seed(conn, count=1)
    policy = make_policy(lease_timeout="1s")
    client = redis.Redis.from_url(redis_url)
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        reconcile.reconcile_once(policy, db=db, broker=publisher)
        # A consumer took the first message and vanished without acking (what a visibility
        # timeout restore or an acks_late redelivery brings back later).
        old_message = client.rpop("insights")
        assert old_message is not None
        old_fence = json.loads(old_message)["headers"]["id"]
        time.sleep(1.2)  # the lease runs out: the entry is dispatched again, new fence
        # ... under a lease long enough for the worker below to start it however slowly
        # this machine boots it (a lease that ran out makes even the current delivery stale).
        patient = make_policy(lease_timeout="60s")
        second = reconcile.reconcile_once(patient, db=db, broker=publisher)
        assert second.published == 1 and second.expired.unstarted == 1
    current_message = client.lindex("insights", 0)
    assert current_message is not None
    current_fence = json.loads(current_message)["headers"]["id"]
    assert current_fence != old_fence
    # The stale message is delivered FIRST (BRPOP takes from the right end).
    client.rpush("insights", old_message)

    worker = start_worker(broker_url=redis_url, dsn=demo_dsn, lease_seconds=60)
    wait_for(lambda: pending_count(conn) == 0, timeout_seconds=30, what="the entry processed")
    # And duplicates of both messages after success: both stale now.
    client.lpush("insights", old_message, current_message)
    wait_for(
        lambda: worker.log().count("dropped a stale delivery") == 3,
        timeout_seconds=30,
        what="three stale deliveries dropped",
    )

    all_runs = audit.runs(conn)
    assert [(run.task_id, run.outcome) for run in all_runs] == [(current_fence, "succeeded")]
    entry = conn.execute(
        "SELECT state, attempt, fence_token::text FROM celery_reconciler.entries"
    ).fetchone()
    assert entry == ("succeeded", 1, current_fence)


def test_max_in_flight_bounds_each_sweep(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str
) -> None:
    schema.seed(conn, count=120)
    policy = make_policy(limits={"batchSize": 7, "maxInFlight": 50})
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        first = reconcile.reconcile_once(policy, db=db, broker=publisher)
        second = reconcile.reconcile_once(policy, db=db, broker=publisher)
        assert (first.published, first.pages) == (50, 8)  # 7 pages of 7, then 1
        assert (second.budget, second.published) == (0, 0)
        assert publisher.queue_depth("insights") == 50
    dispatched = [
        row[0]
        for row in conn.execute("SELECT entry_id::bigint FROM celery_reconciler.entries ORDER BY 1")
    ]
    oldest = [
        row[0]
        for row in conn.execute("SELECT id FROM journal_entry ORDER BY created_at, id LIMIT 50")
    ]
    assert dispatched == oldest  # keyset order follows spec.source.orderBy


def test_a_publish_that_fails_mid_sweep_releases_its_page_and_the_page_claimed_meanwhile(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str
) -> None:
    """Pages are published in a thread while the next one is claimed: when the second
    page's publish fails, the third page has been claimed meanwhile. Both must be released
    at once (eligible for the next sweep) — only the first page is in the queue."""
    schema.seed(conn, count=50)
    policy = make_policy(limits={"batchSize": 10})
    calls: list[int] = []

    with sweep_connections(demo_dsn, broker_url) as (db, publisher):

        def publish_then_fail(messages: Sequence[broker.TaskMessage]) -> None:
            calls.append(len(messages))
            if len(calls) == 2:
                raise reconcile.BrokerUnavailable("the broker went away (simulated)")
            publisher.publish(
                task_name=policy.task.name,
                queue=policy.task.queue,
                messages=messages,
                time_limits_seconds=None,
            )

        with pytest.raises(reconcile.BrokerUnavailable):
            reconcile.reconcile_once(policy, db=db, broker=publisher, publish=publish_then_fail)
        assert publisher.queue_depth("insights") == 10
    live, released = conn.execute(
        "SELECT count(*) FILTER (WHERE lease_deadline > now()), "
        "count(*) FILTER (WHERE lease_deadline <= now()) "
        "FROM celery_reconciler.entries WHERE state = 'queued'"
    ).fetchone() or (None, None)
    assert (live, released) == (10, 20)  # page 1 in the queue; pages 2 and 3 released


def finish_oldest_in_flight(conn: psycopg.Connection[Any]) -> str:
    """A worker finishing the oldest in-flight entry: its body marks the row processed and
    the ledger records the success — one slot of ``maxInFlight`` frees."""
    row = conn.execute(
        "SELECT e.entry_id, e.fence_token::text FROM celery_reconciler.entries e "
        "JOIN journal_entry j ON j.id = e.entry_id::bigint "
        "WHERE e.state = 'queued' ORDER BY j.created_at, j.id LIMIT 1"
    ).fetchone()
    assert row is not None
    entry_id, fence_token = row
    started = ledger.start_attempt(conn, fence_token=fence_token, entry_id=entry_id, worker="t")
    assert started is not None
    conn.execute("UPDATE journal_entry SET insights_extracted = true WHERE id = %s", [entry_id])
    assert ledger.record_success(conn, fence_token=started.fence_token)
    return str(entry_id)


@pytest.mark.parametrize("resumed", [True, False], ids=["resumed", "from-the-start"])
def test_a_sweep_with_one_free_slot_reads_one_page_not_the_in_flight_backlog(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    broker_url: str,
    resumed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The steady state of a backlog larger than ``maxInFlight``: slots free one at a time
    and each sweep may claim one entry. It must cost about one page of ``batchSize`` — not
    one round trip per in-flight entry ahead of the first claimable one — both when the
    sweep resumes where the last one stopped and when it starts a pass from the start (a
    new operator process, or a pass one interval old)."""
    max_in_flight = 60
    schema.seed(conn, count=10 * max_in_flight)
    policy = make_policy(limits={"batchSize": 25, "maxInFlight": max_in_flight})
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        filled = reconcile.reconcile_once(policy, db=db, broker=publisher)
        assert filled.published == max_in_flight
        next_in_order = [
            str(row[0])
            for row in conn.execute(
                "SELECT id FROM journal_entry ORDER BY created_at, id OFFSET %s LIMIT 3",
                [max_in_flight],
            )
        ]
        for expected in next_in_order:
            finish_oldest_in_flight(conn)
            if not resumed:
                monkeypatch.setattr(reconcile, "_positions", {})  # as in a new process
            steady = reconcile.reconcile_once(policy, db=db, broker=publisher)
            assert (steady.budget, steady.published) == (1, 1)
            assert steady.pages == 1  # not max_in_flight + 1 pages of one row
            claimed = conn.execute(
                "SELECT entry_id FROM celery_reconciler.entries "
                "ORDER BY dispatched_at DESC, entry_id::bigint DESC LIMIT 1"
            ).fetchone()
            assert claimed == (expected,)  # the next pending entry in keyset order
        assert publisher.queue_depth("insights") == max_in_flight + 3


def test_a_resumed_sweep_reaches_rows_that_became_pending_ahead_of_it(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str
) -> None:
    """A sweep resumes where the last one ran out of budget; a row that became pending
    ahead of that position is claimed by the next pass — once the pass is one sweep
    interval old, or at once when a sweep reaches the end of the backlog with budget left.
    The sweeps' clock is the test's, so the pass's age is exact."""
    schema.seed(conn, count=40)
    policy = make_policy(limits={"batchSize": 10, "maxInFlight": 30})
    interval = policy.schedule.sweep_interval_seconds
    now = [1000.0]

    def sweep() -> reconcile.SweepResult:
        return reconcile.reconcile_once(policy, db=db, broker=publisher, clock=lambda: now[0])

    def insert_early_row(*, days_ago: int) -> str:
        row = conn.execute(
            'INSERT INTO journal_entry ("user", body, created_at) '
            "VALUES ('demo', 'early', now() - make_interval(days => %s)) RETURNING id::text",
            [days_ago],
        ).fetchone()
        assert row is not None
        return str(row[0])

    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        assert sweep().published == 30
        early = insert_early_row(days_ago=30)
        finish_oldest_in_flight(conn)
        now[0] += interval - 1
        resumed = sweep()
        assert (resumed.published, resumed.pages) == (1, 1)
        assert not claimed(conn, early)  # the next row after the position was
        now[0] += 1  # the pass is one sweep interval old: the next sweep starts over
        finish_oldest_in_flight(conn)
        assert sweep().published == 1 and claimed(conn, early)

        earlier = insert_early_row(days_ago=31)
        for _ in range(12):  # slots for the rest of the backlog, and more
            finish_oldest_in_flight(conn)
        wrapped = sweep()  # resumes, reaches the end, then reads from the start
        assert wrapped.published == 10 and claimed(conn, earlier)
    in_flight = ledger.count_in_flight(conn, policy_key=policy.key)
    assert pending_count(conn) == in_flight == 42 - 14  # every pending row is in flight


def claimed(conn: psycopg.Connection[Any], entry_id: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM celery_reconciler.entries WHERE entry_id = %s", [entry_id]
    ).fetchone()
    return row is not None and row[0] == 1


def ledger_rows_read(conn: psycopg.Connection[Any]) -> int:
    """Rows of the ledger's ``entries`` every scan has read so far (sequential and index)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables "
        "WHERE schemaname = 'celery_reconciler' AND relname = 'entries'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_first_sweep_of_a_large_backlog_reads_the_ledger_once_not_once_per_page(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str
) -> None:
    """A new policy over a backlog: its first sweep fills an empty ledger page by page. Each
    page skips what the ledger holds by one unique-key probe per row it reads; with the
    statistics of the empty ledger PostgreSQL once chose to read every entry the sweep had
    claimed so far for every page instead (10,000 entries in pages of 500: ~10x the
    backlog read, and a sweep time growing with the square of the backlog)."""
    backlog = 10_000
    schema.seed(conn, count=backlog)
    policy = make_policy(limits={"batchSize": 500, "maxInFlight": backlog})
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        db.connection()  # creates the ledger's tables, empty
        before = ledger_rows_read(conn)
        first = reconcile.reconcile_once(policy, db=db, broker=publisher, publish=len)
        read = ledger_rows_read(conn) - before
    assert first.published == backlog
    assert read <= 3 * backlog, f"the sweep read {read:,} ledger rows for {backlog:,} entries"
