"""What a person does to a policy: suspend, resume, sweep now, retry dead, delete."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from e2e_support import (
    OperatorProcess,
    annotate,
    apply_policy,
    get_json,
    ledger_rows,
    metric_value,
    policy_conditions,
    policy_events,
    policy_manifest,
    processingstatus_table,
    seed,
    tally,
    unprocessed,
    wait_for,
)

from celery_app.demo import schema
from devstack import kube as devstack_kube
from devstack import workers

POLICY = "journal-insights"


def annotations(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, str]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", POLICY)
    return dict(policy["metadata"].get("annotations") or {})


def ready(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, object]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", POLICY)
    ready = dict(policy_conditions(policy).get("Ready", {}))
    ready["generation"] = policy["metadata"]["generation"]
    return ready


def test_suspend_stops_dispatch_resume_continues_and_sweep_now_sweeps_at_once(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 20)
    worker_pods("insights-worker-a")
    start_operator()
    # Sweeps an hour apart: anything processed later than the startup sweep was asked for.
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="1h")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=60, what="the startup sweep")

    crds.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        input=policy_manifest(
            sweep_interval="1h", schedule={"sweepInterval": "1h", "suspend": True}
        ),
    )
    wait_for(
        lambda: (
            (r := ready(crds, namespace)).get("reason") == "Suspended"
            and r.get("observedGeneration") == r["generation"]
        ),
        timeout_seconds=30,
        what="Ready reason Suspended for the new generation",
    )
    seed(journal, 10)
    annotate(crds, namespace, "celery-reconciler.io/sweep-now=1")
    wait_for(
        lambda: "celery-reconciler.io/sweep-now" not in annotations(crds, namespace),
        timeout_seconds=30,
        what="the loop to handle the sweep-now request",
    )
    wait_for(
        lambda: processingstatus_table(crds, namespace).get("PENDING") == "10",
        timeout_seconds=30,
        what="ProcessingStatus to count the 10 new pending entries",
    )
    assert unprocessed(journal) == 10
    assert len(ledger_rows(journal)) == 20  # nothing new was claimed while suspended

    crds.kubectl("-n", namespace, "apply", "-f", "-", input=policy_manifest(sweep_interval="1h"))
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=60,
        what="dispatch to continue after resume",
    )

    seed(journal, 5)
    asked = time.monotonic()
    annotate(crds, namespace, "celery-reconciler.io/sweep-now=2")
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=60,
        what="sweep-now to dispatch the new entries (the interval is 1h)",
    )
    print(f"sweep-now: 5 new entries processed {time.monotonic() - asked:.2f}s after asking")
    assert tally(journal).duplicate_successes == 0


def test_retry_dead_brings_a_dead_entry_back(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 3)
    with psycopg.connect(journal, autocommit=True) as conn:
        schema.set_fault(conn, entry_id=2, kind="fail")
    worker_pods("insights-worker-a")
    operator = start_operator()
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        sweep_interval="1h",
        retry={
            "maxAttempts": 2,
            "initialDelay": "1s",
            "factor": 2,
            "maxDelay": "2s",
            "jitter": False,
        },
    )
    wait_for(
        lambda: processingstatus_table(crds, namespace).get("DEAD") == "1",
        timeout_seconds=60,
        what="the failing entry to be dead-lettered after 2 attempts",
    )
    [(entry_id, _state, _worker, attempt)] = ledger_rows(journal, state="dead")
    assert (entry_id, attempt) == ("2", 2)
    assert unprocessed(journal) == 1

    with psycopg.connect(journal, autocommit=True) as conn:
        schema.clear_fault(conn, entry_id=2)
    annotate(crds, namespace, "celery-reconciler.io/retry-dead=all")
    wait_for(
        lambda: unprocessed(journal) == 0, timeout_seconds=60, what="the revived entry to succeed"
    )
    events = policy_events(crds, namespace)
    assert any(e["reason"] == "RetryDead" for e in events)
    wait_for(
        lambda: processingstatus_table(crds, namespace).get("DEAD") == "0",
        timeout_seconds=30,
        what="DEAD back to 0",
    )
    text = operator.metrics_text()
    assert metric_value(text, "celery_reconciler_dead", namespace=namespace, policy=POLICY) == 0


def test_deleting_a_policy_stops_its_loop_and_collects_its_status(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 5)
    worker_pods("insights-worker-a")
    operator = start_operator()
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="1s")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=60, what="first entries")
    wait_for(
        lambda: processingstatus_table(crds, namespace),
        timeout_seconds=30,
        what="the ProcessingStatus",
    )

    crds.kubectl("-n", namespace, "delete", "processingpolicy", POLICY, "--timeout=60s")
    wait_for(
        lambda: (
            "No resources found"
            in crds.kubectl("-n", namespace, "get", "processingstatus", check=False).stderr
        ),
        timeout_seconds=60,
        what="garbage collection of the ProcessingStatus",
    )
    wait_for(
        lambda: (
            f"policy {namespace}/{POLICY}: loop stopped" in operator.process.log_path.read_text()
        ),
        timeout_seconds=30,
        what="the loop to stop",
    )
    seed(journal, 3)
    time.sleep(3)  # three sweep intervals of the deleted policy
    assert unprocessed(journal) == 3
