"""A slow database does not kill a worker's bodies before their fence can be lost (issue 21).

The heartbeat runs with a statement and a lock timeout, so a slow database fails a heartbeat
instead of holding it; the watchdog kills the bodies only when the operator could hand their
entries out, not at the first heartbeats that did not get through. Real PostgreSQL, a real
``celery worker``, the real ``reconcile_once`` as the operator; the slowness is real too: a
transaction holds the lock of the worker's incarnation row, which every heartbeat needs.
"""

from __future__ import annotations

import datetime
from typing import Any

import psycopg
import pytest
from fencing_support import (
    BodyWatch,
    Sweeper,
    ledger_states,
    lost_attempts,
    overlapping,
    successes_by_entry,
    timed_runs,
)
from reconcile_support import WorkerFactory, make_policy, pending_count, wait_for

from celery_app.demo import audit, schema

pytestmark = pytest.mark.integration

HEARTBEAT_TIMEOUT_SECONDS = 12.0
# Past the old self-fence (half the timeout after the last renewal sent) and short of the
# moment the operator may end a silent incarnation (the whole timeout).
LOCK_HELD_SECONDS = 0.57 * HEARTBEAT_TIMEOUT_SECONDS
BODY_SECONDS = 2.5 * HEARTBEAT_TIMEOUT_SECONDS


def live_incarnation(conn: psycopg.Connection[Any], worker: str) -> tuple[Any, datetime.datetime]:
    row = conn.execute(
        "SELECT id, heartbeat_at FROM celery_reconciler.incarnations "
        "WHERE hostname = %s AND ended_at IS NULL",
        [worker],
    ).fetchone()
    assert row is not None, f"worker {worker} has no live incarnation"
    return row[0], row[1]


@pytest.mark.parametrize(("pool", "bodies"), [("prefork", 1), ("threads", 2)])
def test_a_lock_on_the_incarnation_row_for_half_the_timeout_kills_no_body(
    pool: str,
    bodies: int,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    """Right after a heartbeat got through, a transaction locks the worker's incarnation row
    for more than half the heartbeat timeout: every heartbeat in that time waits for the
    lock and fails at its lock timeout. The operator could end the incarnation only a whole
    timeout after that heartbeat, so the bodies run on; the first heartbeat after the lock is
    released renews it, and each body finishes once, with no attempt charged."""
    schema.seed(conn, count=bodies)
    for entry_id in range(1, bodies + 1):
        schema.set_fault(
            conn, entry_id=entry_id, kind="sleep", seconds=BODY_SECONDS, unfenced=entry_id == 2
        )
    worker = start_worker(
        broker_url=redis_url,
        dsn=demo_dsn,
        concurrency=bodies,
        pool=pool,
        extra_env={"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_SECONDS)},
    )
    policy = make_policy(lease_timeout="10m")
    with BodyWatch(demo_dsn) as watch, Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
        wait_for(
            lambda: list(ledger_states(conn).values()) == ["running"] * bodies,
            timeout_seconds=60,
            what="every body running",
        )
        incarnation, renewed = live_incarnation(conn, worker.name)
        wait_for(
            lambda: live_incarnation(conn, worker.name)[1] > renewed,
            timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
            what="a heartbeat to get through",
            poll_seconds=0.02,
        )
        with psycopg.connect(demo_dsn) as locker:
            locker.execute(
                "SELECT 1 FROM celery_reconciler.incarnations WHERE id = %s FOR UPDATE",
                [incarnation],
            )
            _, renewed = live_incarnation(conn, worker.name)
            wait_for(
                lambda: (audit.database_now(conn) - renewed).total_seconds() > LOCK_HELD_SECONDS,
                timeout_seconds=2 * HEARTBEAT_TIMEOUT_SECONDS,
                what="the lock held past half the heartbeat timeout",
            )
            locker.commit()
        wait_for(
            lambda: pending_count(conn) == 0,
            timeout_seconds=BODY_SECONDS + 60,
            what="every body finished",
            poll_seconds=0.3,
        )
        runs = timed_runs(conn, died_at=dict(watch.died_at))

    verdict = {
        "runs": len(runs),
        "overlapping runs": len(overlapping(runs)),
        "attempts charged as lost": len(lost_attempts(conn)),
        "effects applied": successes_by_entry(conn),
        "live incarnations of the worker": conn.execute(
            "SELECT count(*) FROM celery_reconciler.incarnations "
            "WHERE hostname = %s AND ended_at IS NULL",
            [worker.name],
        ).fetchone(),
    }
    assert verdict == {
        "runs": bodies,
        "overlapping runs": 0,
        "attempts charged as lost": 0,
        "effects applied": dict.fromkeys(range(1, bodies + 1), 1),
        "live incarnations of the worker": (1,),
    }, (runs, lost_attempts(conn))
