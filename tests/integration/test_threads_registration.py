"""The threads pool re-registers one incarnation at a time (issue 21, build item 4).

In the threads pool every body of a worker runs in one process, so several bodies can find,
at the same moment, that the incarnation they were about to start under has ended (the
operator ended it, or its guardian proved it gone). Each must register again before it may
run, and those registrations race: a registration that replaces one made a moment earlier
by another thread orphans it — nothing heartbeats it, so the operator ends it after the
heartbeat timeout and re-dispatches the entries of the bodies still running under it. Real
PostgreSQL, a real ``celery worker -P threads``, the real ``reconcile_once`` as the operator;
every verdict from the bodies' own ``task_runs`` rows and the ledger, on PostgreSQL's clock.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from fencing_support import (
    BodyWatch,
    Sweeper,
    lost_attempts,
    overlapping,
    successes_by_entry,
    timed_runs,
)
from reconcile_support import WorkerFactory, make_policy, pending_count, wait_for

from celery_app.demo import schema

pytestmark = pytest.mark.integration

# Long enough that the heartbeat thread seldom notices the ending before the bodies do (one
# heartbeat every fifth of it), short enough that an orphaned incarnation ends in the test.
HEARTBEAT_TIMEOUT_SECONDS = 10
THREADS = 6
# The bodies outlive two heartbeat timeouts: an orphaned incarnation is ended under them.
BODY_SECONDS = 2.5 * HEARTBEAT_TIMEOUT_SECONDS


def incarnations_of(conn: psycopg.Connection[Any], worker: str) -> list[tuple[uuid.UUID, bool]]:
    """(id, still live) of every incarnation the worker registered, oldest first."""
    return [
        (row[0], row[1] is None)
        for row in conn.execute(
            "SELECT id, ended_at FROM celery_reconciler.incarnations WHERE hostname = %s "
            "ORDER BY started_at",
            [worker],
        )
    ]


def running_incarnations(conn: psycopg.Connection[Any], worker: str) -> dict[str, uuid.UUID]:
    """Entry id -> the incarnation its running attempt was started under."""
    return {
        str(row[0]): row[1]
        for row in conn.execute(
            "SELECT entry_id, incarnation FROM celery_reconciler.entries "
            "WHERE state = 'running' AND worker = %s",
            [worker],
        )
    }


def waiting_on_a_lock(conn: psycopg.Connection[Any], worker: str) -> int:
    """How many of the worker's task-side ledger sessions (not its heartbeat's) wait for a
    row lock."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND application_name = %s",
        [f"celery-worker {worker}"],
    ).fetchone()
    return int(row[0]) if row else 0


def test_threads_that_find_their_incarnation_ended_at_once_register_one_new_incarnation(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str, start_worker: WorkerFactory
) -> None:
    """A threads worker's incarnation is ended between bodies; then ``THREADS`` deliveries
    reach its ``THREADS`` threads together, each refused under the ended incarnation. They
    register exactly one new incarnation between them, every body runs under it (so its
    heartbeat renews their leases), and nothing is re-dispatched under them: after two
    heartbeat timeouts, with a second worker's free slots waiting for any re-dispatch, no
    run of an entry overlaps another and each entry's effect (half of them committed through
    ``fenced_transaction``, half plainly) is applied once."""
    policy = make_policy(lease_timeout="10m")
    env = {"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_SECONDS)}
    racing = start_worker(
        broker_url=redis_url, dsn=demo_dsn, concurrency=THREADS, pool="threads", extra_env=env
    )
    schema.seed(conn, count=1)
    with BodyWatch(demo_dsn) as watch, Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
        wait_for(
            lambda: pending_count(conn) == 0,
            timeout_seconds=60,
            what="the first body, which registers the worker's first incarnation",
        )
        [(first, live)] = incarnations_of(conn, racing.name)
        assert live
        for entry_id in range(2, THREADS + 2):  # the ids the entries seeded next get
            schema.set_fault(
                conn,
                entry_id=entry_id,
                kind="sleep",
                seconds=BODY_SECONDS,
                unfenced=entry_id % 2 == 0,
            )
        # What the operator does to an incarnation it found silent, or a guardian to one it
        # proved gone — held uncommitted until every thread has its delivery: the fence
        # checks (and the heartbeat) wait on the incarnation's row lock, and all of them
        # find it ended in the same instant, at the commit.
        with psycopg.connect(demo_dsn) as ending:
            ending.execute(
                "UPDATE celery_reconciler.incarnations SET ended_at = now(), "
                "ended_reason = 'ended by the test between two bodies' WHERE id = %s",
                [first],
            )
            schema.seed(conn, count=THREADS)  # one transaction: dispatched by one sweep
            wait_for(
                lambda: (
                    racing.log().count("] received") == THREADS + 1
                    and waiting_on_a_lock(conn, racing.name) > 0
                ),
                timeout_seconds=60,
                what=f"all {THREADS} deliveries taken, fence checks waiting on the ending",
                poll_seconds=0.05,
            )
            ending.commit()
        wait_for(
            lambda: len(running_incarnations(conn, racing.name)) == THREADS,
            timeout_seconds=60,
            what=f"all {THREADS} threads running a body",
            poll_seconds=0.05,
        )
        registered = incarnations_of(conn, racing.name)
        held = running_incarnations(conn, racing.name)
        start_worker(
            broker_url=redis_url, dsn=demo_dsn, concurrency=THREADS, pool="threads", extra_env=env
        )  # free slots, should anything be re-dispatched
        wait_for(
            lambda: pending_count(conn) == 0,
            timeout_seconds=BODY_SECONDS + 60,
            what="every body finished",
            poll_seconds=0.3,
        )
        runs = timed_runs(conn, died_at=dict(watch.died_at))

    new = [incarnation for incarnation, live in registered if live]
    assert registered[0][0] == first
    overlaps = overlapping(runs)
    # Every figure at once, so a failure shows the whole picture.
    verdict = {
        "incarnations registered after the ending": len(registered) - 1,
        "live incarnations while the bodies ran": len(new),
        "bodies under an incarnation nobody renews": sum(i not in new for i in held.values()),
        "overlapping runs": len(overlaps),
        "attempts charged as lost": len(lost_attempts(conn)),
        "entries whose effect was not applied exactly once": sorted(
            entry for entry, count in successes_by_entry(conn).items() if count != 1
        ),
        "incarnations live at the end": sum(live for _, live in incarnations_of(conn, racing.name)),
    }
    assert verdict == {
        "incarnations registered after the ending": 1,
        "live incarnations while the bodies ran": 1,
        "bodies under an incarnation nobody renews": 0,
        "overlapping runs": 0,
        "attempts charged as lost": 0,
        "entries whose effect was not applied exactly once": [],
        "incarnations live at the end": 1,
    }, (registered, held, overlaps)
