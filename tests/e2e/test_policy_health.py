"""What a policy says about itself when its sweeps work but the work does not get done:
another policy already owns its rows (``Conflict``), no worker takes what it dispatched
(``WorkersNotConsuming``), or the API refuses the watch of its worker pods
(``PodWatchFailed``). The real operator, apiserver, database, broker and workers."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from e2e_support import (
    WORKER_LABELS,
    OperatorProcess,
    apply_policy,
    get_json,
    policy_conditions,
    policy_events,
    policy_manifest,
    seed,
    tally,
    unprocessed,
    wait_for,
)
from test_worker_identity import apply_docs, operator_rbac, without_pod_rights

from celery_app.demo import schema
from devstack import kube as devstack_kube
from devstack import processes

FIRST, SECOND = "journal-insights", "journal-insights-again"


def condition(
    kube: devstack_kube.ControlPlane, namespace: str, name: str, type_: str
) -> dict[str, Any]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", name)
    return dict(policy_conditions(policy).get(type_, {}))


def ledger_entries_by_policy(dsn: str) -> dict[str, int]:
    """Ledger rows per policy key: what each policy ever claimed."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT policy_key, count(*) FROM celery_reconciler.entries GROUP BY policy_key"
        ).fetchall()
    return {str(key): int(count) for key, count in rows}


def test_a_second_policy_on_the_same_table_and_task_yields_until_the_first_is_deleted(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    local_workers("insights-worker-a")
    start_operator(namespaces=(namespace,))
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s")
    wait_for(
        lambda: condition(crds, namespace, FIRST, "Ready").get("status") == "True",
        timeout_seconds=60,
        what=f"{FIRST} Ready",
    )
    # Same Secret, same table, same task: only its name differs.
    crds.kubectl(
        "-n", namespace, "apply", "-f", "-",
        input=policy_manifest(SECOND, sweep_interval="2s"),
    )  # fmt: skip
    degraded = wait_for(
        lambda: (
            (c := condition(crds, namespace, SECOND, "Degraded")).get("reason") == "Conflict" and c
        ),
        timeout_seconds=60,
        what=f"{SECOND} Degraded with reason Conflict",
    )
    assert degraded["status"] == "True"
    assert FIRST in degraded["message"]
    assert condition(crds, namespace, SECOND, "Ready")["status"] == "False"
    assert any(e["reason"] == "Conflict" for e in policy_events(crds, namespace, SECOND))

    seed(journal, 40)
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="40 entries processed")
    counted = tally(journal)
    assert (counted.processed, counted.runs, counted.duplicate_successes) == (40, 40, 0)
    assert ledger_entries_by_policy(journal) == {f"{namespace}/{FIRST}": 40}
    assert condition(crds, namespace, FIRST, "Ready")["status"] == "True"

    crds.kubectl("-n", namespace, "delete", "processingpolicy", FIRST)
    wait_for(
        lambda: condition(crds, namespace, SECOND, "Ready").get("status") == "True",
        timeout_seconds=60,
        what=f"{SECOND} Ready once {FIRST} is gone",
    )
    seed(journal, 10)
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="10 more processed")
    assert ledger_entries_by_policy(journal)[f"{namespace}/{SECOND}"] == 10


def test_work_that_no_worker_takes_reports_workers_not_consuming_until_one_does(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    local_workers("worker-of-another-queue", queue="reports")
    start_operator(namespaces=(namespace,))
    seed(journal, 10)
    workers = {"podSelector": {"matchLabels": WORKER_LABELS}, "startTimeout": "3s"}
    apply_policy(
        crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s", workers=workers
    )
    stuck = wait_for(
        lambda: (
            (c := condition(crds, namespace, FIRST, "Degraded")).get("reason")
            == "WorkersNotConsuming"
            and c
        ),
        timeout_seconds=60,
        what="Degraded with reason WorkersNotConsuming",
    )
    assert condition(crds, namespace, FIRST, "Ready")["status"] == "False"
    for what_to_check in ("'insights'", schema.TASK_NAME, "CELERY_RECONCILER_DSN"):
        assert what_to_check in stuck["message"]
    # It names the broker it published to (a worker on another broker is the other cause),
    # without its credentials.
    broker = urllib.parse.urlsplit(redis_url)
    assert f"redis {broker.hostname}:{broker.port}/" in stuck["message"], stuck["message"]
    if broker.password:
        assert broker.password not in stuck["message"]
    events = policy_events(crds, namespace, FIRST)
    assert any(e["reason"] == "WorkersNotConsuming" for e in events)
    assert unprocessed(journal) == 10

    local_workers("insights-worker-a")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="all processed")
    wait_for(
        lambda: condition(crds, namespace, FIRST, "Ready").get("status") == "True",
        timeout_seconds=60,
        what="Ready=True once a worker takes the work",
    )
    assert condition(crds, namespace, FIRST, "Degraded")["status"] == "False"


def test_a_pod_watch_the_api_refuses_degrades_the_policy_until_it_is_allowed(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    tmp_path: Path,
) -> None:
    """The operator runs under the chart's RBAC without its pods rule: the watch gets 403."""
    rbac = operator_rbac(crds, namespace=namespace)
    fullname = f"rbac-{namespace}-celery-reconciler"
    apply_docs(crds, without_pod_rights(rbac))
    try:
        config = crds.service_account_kubeconfig(
            namespace=namespace, service_account=fullname, path=tmp_path / "sa.kubeconfig"
        )
        start_operator(kubeconfig=config, namespaces=(namespace,))
        apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s")
        degraded = wait_for(
            lambda: (
                (c := condition(crds, namespace, FIRST, "Degraded")).get("reason")
                == "PodWatchFailed"
                and c
            ),
            timeout_seconds=60,
            what="Degraded with reason PodWatchFailed",
        )
        assert "HTTP 403" in degraded["message"]
        assert "app=insights-worker" in degraded["message"]
        assert condition(crds, namespace, FIRST, "Ready")["status"] == "False"

        apply_docs(crds, rbac)
        wait_for(
            lambda: condition(crds, namespace, FIRST, "Ready").get("status") == "True",
            timeout_seconds=60,
            what="Ready=True once the operator may watch pods again",
        )
    finally:
        crds.kubectl("delete", "clusterrole,clusterrolebinding", fullname, check=False)
