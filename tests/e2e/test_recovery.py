"""Recovery on the real stack: worker pods that die, an operator that dies, two replicas.

Worker pods are real Pods of the image on the devstack node: a restart is the kubelet's,
after a SIGKILL of the container's main process, and a deletion is ``kubectl delete pod``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import psycopg
import pytest
from e2e_support import (
    OperatorProcess,
    apply_policy,
    get_json,
    ledger_rows,
    metric_value,
    policy_events,
    seed,
    tally,
    unprocessed,
    wait_for,
)

from celery_app.demo import audit, schema
from devstack import kube as devstack_kube
from devstack import processes, workers
from devstack import redis as devstack_redis


def overlaps(dsn: str, killed: dict[str, object]) -> list[tuple[audit.Run, audit.Run]]:
    with psycopg.connect(dsn) as conn:
        return audit.overlapping_runs(audit.runs(conn), killed_at=killed)  # type: ignore[arg-type]


def database_now(dsn: str) -> object:
    with psycopg.connect(dsn) as conn:
        return audit.database_now(conn)


@pytest.mark.parametrize("how", ["restart", "delete"])
def test_a_dead_worker_pods_entries_are_rescued_long_before_the_lease(
    how: str,
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 6)
    with psycopg.connect(journal, autocommit=True) as conn:
        for entry_id in range(1, 7):
            schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=600)
    doomed = worker_pods("insights-worker-a", concurrency=2)
    operator = start_operator()
    # The lease is 10 minutes and sweeps are an hour apart: only the pod hook can rescue.
    apply_policy(
        crds, namespace, dsn=journal, broker_url=redis_url, lease_timeout="10m", sweep_interval="1h"
    )
    held = wait_for(
        lambda: (
            len(rows := ledger_rows(journal, state="running", worker="insights-worker-a")) == 2
            and rows
        ),
        timeout_seconds=60,
        what="worker a to be running two entries",
    )
    held_ids = [int(row[0]) for row in held]
    # Only the entries not yet started lose their fault now. A held body may be between its
    # ledger start and its read of demo_faults: clearing its fault before the kill would let
    # it finish, leaving one entry to rescue instead of two.
    with psycopg.connect(journal, autocommit=True) as conn:
        conn.execute("DELETE FROM demo_faults WHERE entry_id <> ALL(%s)", [held_ids])
    noticed = time.monotonic()
    main_pid = doomed.main_pid()
    if how == "restart":
        # The kubelet sees the container die, restarts it and reports restartCount 1.
        doomed.kill()
    else:
        # SIGTERM, then SIGKILL a second later; the Pod object goes once its containers did.
        doomed.delete(grace_seconds=1)
    # The bodies end when the container's init does (its PID namespace dies with it).
    wait_for(
        lambda: not processes.pid_alive(main_pid), timeout_seconds=30, what="the worker to die"
    )
    killed_at = database_now(journal)
    with psycopg.connect(journal, autocommit=True) as conn:
        conn.execute("DELETE FROM demo_faults")
    worker_pods("insights-worker-b", concurrency=2)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=120,
        what="the orphaned entries to be processed",
    )
    rescue_seconds = time.monotonic() - noticed
    print(
        f"rescue after pod {how}: all {len(held)} orphaned entries processed in "
        f"{rescue_seconds:.2f}s (lease 600s)"
    )

    status = get_json(crds, "-n", namespace, "get", "processingstatus", "journal-insights")
    last_rescue = wait_for(
        lambda: get_json(crds, "-n", namespace, "get", "processingstatus", "journal-insights")[
            "status"
        ].get("lastRescue"),
        timeout_seconds=30,
        what="lastRescue in ProcessingStatus",
    )
    assert last_rescue["pod"] == "insights-worker-a"
    assert last_rescue["count"] == 2
    assert status["metadata"]["ownerReferences"][0]["kind"] == "ProcessingPolicy"
    events = policy_events(crds, namespace)
    assert any(e["reason"] == "Rescued" and "insights-worker-a" in e["message"] for e in events)
    counted = tally(journal)
    assert (counted.processed, counted.duplicate_successes) == (6, 0)
    assert overlaps(journal, {"insights-worker-a": killed_at}) == []
    rescued = metric_value(
        operator.metrics_text(),
        "celery_reconciler_rescued_total",
        namespace=namespace,
        policy="journal-insights",
    )
    assert rescued == 2


def test_an_operator_killed_mid_sweep_finishes_the_work_after_restart(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 3000)
    worker_pods("insights-worker-a", concurrency=4)
    first = start_operator(name="operator-1")
    # A paced dispatch makes the sweep last ~15 s, so the kill lands in the middle of it.
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        sweep_interval="1h",
        lease_timeout="20s",
        limits={"batchSize": 50, "maxInFlight": 10000, "dispatchPerSecond": 200},
    )
    wait_for(
        lambda: len(ledger_rows(journal)) >= 300,
        timeout_seconds=60,
        what="the first sweep to be under way",
    )
    first.kill()
    claimed_when_killed = len(ledger_rows(journal))
    assert 0 < claimed_when_killed < 3000, claimed_when_killed

    start_operator(name="operator-2")
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=240,
        what="the restarted operator's startup sweep to finish the work",
    )
    counted = tally(journal)
    assert (counted.processed, counted.duplicate_successes) == (3000, 0)
    assert overlaps(journal, {}) == []


def test_of_two_replicas_exactly_one_dispatches(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    peering = f"e2e-{namespace}"
    crds.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "kopf.dev/v1",
                "kind": "ClusterKopfPeering",
                "metadata": {"name": peering},
            }
        ),
    )
    seed(journal, 200)
    worker_pods("insights-worker-a", concurrency=2)
    replicas = [
        start_operator(name=f"replica-{n}", peering=peering, extra_args=["--peering-lifetime=10"])
        for n in (1, 2)
    ]
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="all processed")

    def dispatched(replica: OperatorProcess) -> float:
        return metric_value(
            replica.metrics_text(),
            "celery_reconciler_dispatched_total",
            namespace=namespace,
            policy="journal-insights",
        )

    counts = sorted(dispatched(r) for r in replicas)
    assert counts == [0.0, 200.0]
    active = max(replicas, key=dispatched)
    standby = min(replicas, key=dispatched)

    active.kill()
    seed(journal, 50)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=120,
        what="the standby replica to take over",
    )
    assert dispatched(standby) == 50.0
    assert tally(journal).duplicate_successes == 0


def test_a_broker_restart_that_lost_the_queue_is_redispatched_at_once(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    private_redis: devstack_redis.RedisServer,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 20)
    operator = start_operator()
    # No worker yet: the messages wait in Redis. Leases are 10 minutes, sweeps an hour apart.
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=private_redis.url,
        lease_timeout="10m",
        sweep_interval="1h",
    )
    wait_for(
        lambda: len(ledger_rows(journal, state="queued")) == 20,
        timeout_seconds=60,
        what="20 entries queued in the broker",
    )
    wait_for(
        lambda: (
            metric_value(
                operator.metrics_text(),
                "celery_reconciler_queue_depth",
                namespace=namespace,
                policy="journal-insights",
            )
            == 20
        ),
        timeout_seconds=30,
        what="the queue-depth gauge to show the 20 waiting messages",
    )
    private_redis.restart()  # no persistence: the 20 messages are gone
    restarted = time.monotonic()
    worker_pods("insights-worker-a", broker_url=private_redis.url)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=120,
        what="the lost messages to be re-dispatched (the lease is 10 minutes)",
    )
    print(
        f"broker restart: 20 lost messages re-dispatched and processed in "
        f"{time.monotonic() - restarted:.2f}s (lease 600s)"
    )
    events = get_json(
        crds,
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=journal-insights",
    )
    assert any(e["reason"] == "BrokerRestarted" for e in events["items"])
    assert tally(journal).duplicate_successes == 0
