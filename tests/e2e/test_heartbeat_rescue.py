"""A worker outside Kubernetes that dies between two sweeps is rescued when its heartbeats
stop, not at the next sweep.

Issue 23: the Django example's e2e failed under load with "timed out after 240s waiting
for all 120 entries processed". Its second killed worker held two running entries, and the
operator did not sweep again for minutes: the loop chose how long to sleep at the end of a
sweep, from the heartbeat deadlines of the attempts running *then*. A body that started
after that sweep, on a worker that then died, waited for the next sweep interval (5 minutes
by default) instead of its worker's heartbeat timeout. Here the only body starts after the
policy's first sweep, the next sweep is 10 minutes away and the lease 15: a rescue within
the bound below can only come from noticing the missed heartbeats.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from e2e_support import OperatorProcess, apply_policy, ledger_rows, seed, unprocessed, wait_for

from celery_app.demo import schema
from devstack import kube as devstack_kube
from devstack import processes

pytestmark = pytest.mark.e2e

HEARTBEAT_TIMEOUT_SECONDS = 6
SWEEP_INTERVAL = "10m"
LEASE = "15m"


def lost_attempts_by_worker(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT worker FROM celery_reconciler.attempts WHERE outcome = 'lost' ORDER BY worker"
        ).fetchall()
    return [row[0] for row in rows]


def test_a_worker_killed_after_the_last_sweep_is_rescued_before_the_next_sweep(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    seed(journal, 1)
    with psycopg.connect(journal, autocommit=True) as conn:
        schema.set_fault(conn, entry_id=1, kind="sleep", seconds=600)
    heartbeat = {"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_SECONDS)}
    start_operator()
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        sweep_interval=SWEEP_INTERVAL,
        lease_timeout=LEASE,
    )
    # Dispatched while no worker exists: that sweep saw nothing running, so it scheduled the
    # next one by the interval and the lease alone.
    wait_for(
        lambda: ledger_rows(journal, state="queued"),
        timeout_seconds=120,
        what="the policy's first sweep to dispatch the entry",
    )
    victim = local_workers("worker-victim", extra_env=heartbeat)
    wait_for(
        lambda: ledger_rows(journal, state="running", worker="worker-victim"),
        timeout_seconds=120,
        what="the entry's body running in worker-victim",
    )
    with psycopg.connect(journal, autocommit=True) as conn:
        schema.clear_fault(conn, entry_id=1)
    victim.kill()  # the whole process group: no heartbeat from it again
    local_workers("worker-rescuer", extra_env=heartbeat)
    # The rescue is due 6 s after the last heartbeat; 180 s leaves a loaded machine room to
    # notice and re-dispatch it, and is still far from the 10-minute sweep and 15-minute
    # lease that are the only other ways the entry could run again.
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=180,
        what="the dead worker's entry to run again before the next sweep",
    )
    assert lost_attempts_by_worker(journal) == ["worker-victim"]
