"""Rescued work runs next, on every broker: ahead of a backlog of 2,000 queued messages.

A worker dies while it runs one entry; 2,000 other entries are queued behind it, and either
a bystander worker is draining them or the dead worker was the only one (its replacement
starts after the rescue: at the rescue nobody consumes anything). The rescue re-dispatches
the dead worker's entry, and its body must start among the first few bodies any worker
starts after the rescue has published it — not after the backlog. The order is read from
``task_runs`` (ids count up as bodies start), never from a clock. Bodies the bystander
starts while the rescue itself still runs (ending incarnations, settling attempts, asking
the broker where to publish) were never behind the rescued message: under load that is a
few dozen quick bodies, and counting them once failed this test for no fault of the order.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from reconcile_support import WorkerFactory, make_policy, sweep_connections, wait_for

from celery_app.demo import schema
from celery_reconciler import ledger, planning, reconcile

pytestmark = pytest.mark.integration

BACKLOG = 2000
RESCUED_ENTRY = 1  # seeded first, so dispatched first and taken by the victim
# Bodies another worker may start between the rescue and the rescued body: those it had
# already taken (prefetch) and the few the broker hands out before the rescue's message.
STARTED_FIRST_AT_MOST = 10
# How many bodies to watch start after the rescue before calling it lost behind the backlog.
WATCHED_BODIES = 200


def last_run_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(id), 0) FROM task_runs").fetchone()
    assert row is not None
    return int(row[0])


def runs_since(
    conn: psycopg.Connection[Any], run_id: int, *, until: int | None = None
) -> list[tuple[int, str]]:
    """``(entry_id, task_id)`` of every body started after run ``run_id`` (and no later than
    run ``until``), in start order."""
    return [
        (int(entry_id), str(task_id))
        for entry_id, task_id in conn.execute(
            "SELECT entry_id, task_id FROM task_runs WHERE id > %s AND id <= %s ORDER BY id",
            [run_id, until if until is not None else 2**63 - 1],
        ).fetchall()
    ]


@pytest.mark.parametrize("other_worker", ["draining", "replacement"])
def test_a_rescued_entry_starts_before_the_backlog_queued_ahead_of_it(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    broker_url: str,
    start_worker: WorkerFactory,
    other_worker: str,
) -> None:
    schema.seed(conn, count=1 + BACKLOG)
    # The victim's body runs until the kill; the backlog's bodies are quick.
    schema.set_fault(conn, entry_id=RESCUED_ENTRY, kind="sleep", seconds=600)
    policy = make_policy(lease_timeout="10m", limits={"batchSize": 500, "maxInFlight": 10_000})
    victim_pod_uid = "5e5c0e00-0000-4000-8000-000000000001"
    victim = start_worker(
        broker_url=broker_url,
        dsn=demo_dsn,
        concurrency=1,
        lease_seconds=600,
        extra_env={"CELERY_RECONCILER_POD_UID": victim_pod_uid},
    )
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        dispatched = reconcile.reconcile_once(policy, db=db, broker=publisher)
        assert dispatched.published == 1 + BACKLOG
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM task_runs WHERE entry_id = %s AND worker = %s",
                    [RESCUED_ENTRY, victim.name],
                ).fetchone()
                == (1,)
            ),
            timeout_seconds=60,
            what="the victim running the first entry",
        )

        def start_the_other_worker() -> None:
            start_worker(
                broker_url=broker_url,
                dsn=demo_dsn,
                concurrency=1,
                lease_seconds=600,
                extra_env={"CELERY_RECONCILER_POD_UID": "5e5c0e00-0000-4000-8000-000000000002"},
            )

        if other_worker == "draining":
            start_the_other_worker()
            wait_for(
                lambda: len(runs_since(conn, 0)) > 5,
                timeout_seconds=60,
                what="the bystander draining the backlog",
            )
        victim.kill()
        schema.clear_fault(conn, entry_id=RESCUED_ENTRY)
        before_rescue = last_run_id(conn)
        rescued = reconcile.rescue(
            policy,
            db=db,
            broker=publisher,
            ending=planning.PodEnding(
                pod_uid=victim_pod_uid, reason="its pod was deleted", whole_pod=True
            ),
        )
        assert rescued.redispatched == 1
        published_at_run = last_run_id(conn)
        queued_ahead = ledger.counts(conn, policy_key=policy.key).queued - 1
        assert queued_ahead > BACKLOG // 2, "the bystander drained the backlog too soon"
        if other_worker == "replacement":
            start_the_other_worker()

    (fence,) = conn.execute(
        "SELECT fence_token FROM celery_reconciler.entries WHERE entry_id = %s",
        [str(RESCUED_ENTRY)],
    ).fetchone() or (None,)

    def rescued_started_or_enough_watched() -> bool:
        runs = runs_since(conn, before_rescue)
        watched = runs_since(conn, published_at_run)
        return (RESCUED_ENTRY, str(fence)) in runs or len(watched) >= WATCHED_BODIES

    wait_for(
        rescued_started_or_enough_watched,
        timeout_seconds=180,
        what=f"the rescued body or {WATCHED_BODIES} others starting",
    )
    during_rescue = runs_since(conn, before_rescue, until=published_at_run)
    after_publish = runs_since(conn, published_at_run)
    rescued_run = (RESCUED_ENTRY, str(fence))
    started_before = (
        0
        if rescued_run in during_rescue
        else after_publish.index(rescued_run)
        if rescued_run in after_publish
        else None
    )
    assert started_before is not None and started_before <= STARTED_FIRST_AT_MOST, (
        f"the rescued entry, with {queued_ahead} entries queued ahead of it, started after "
        f"{started_before if started_before is not None else f'more than {len(after_publish)}'} "
        f"other bodies once the rescue had published it ({len(during_rescue)} more started "
        "while the rescue ran)"
    )
