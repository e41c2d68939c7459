"""The rescue never runs an entry twice: liveness is a fact about a worker incarnation.

Issue 11, on the real stack (apiserver, operator process, PostgreSQL, Redis, celery
workers). The lease is 10 minutes and sweeps run every 3 s, so any second run of an entry
in these tests was dispatched by the rescue, never by lease expiry. Workers the operator
cannot see in Kubernetes — a ``HOSTNAME`` that is no Pod, a Pod in another namespace or
outside the selector, any worker while the pod watch fails — keep their running attempts
(they heartbeat); a same-name pod restart ends only the old process's attempts; and a rescue
after a PostgreSQL restart still happens within seconds. Every verdict comes from the
database: ``task_runs`` (one row per body run) and the ledger's attempts.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from e2e_support import (
    WORKER_LABELS,
    OperatorProcess,
    apply_policy,
    seed,
    unprocessed,
    wait_for,
)

from celery_app.demo import audit, schema
from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import postgres as devstack_postgres
from devstack import processes, workers

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "celery-reconciler"
LEASE = "10m"
SWEEP_INTERVAL = "3s"
BODY_SECONDS = 25.0
ENTRIES = 4


def seed_long_bodies(dsn: str, *, count: int = ENTRIES, seconds: float = BODY_SECONDS) -> None:
    seed(dsn, count)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for entry_id in range(1, count + 1):
            schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=seconds)


def clear_faults(dsn: str, entry_ids: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for entry_id in entry_ids:
            schema.clear_fault(conn, entry_id=entry_id)


def runs(dsn: str) -> list[audit.Run]:
    with psycopg.connect(dsn) as conn:
        return audit.runs(conn)


def database_now(dsn: str) -> Any:
    with psycopg.connect(dsn) as conn:
        return audit.database_now(conn)


def unfinished_runs(dsn: str, *, worker: str, started_after: Any = None) -> list[int]:
    """Entries whose body runs on ``worker`` now (optionally: started after a moment)."""
    return sorted(
        run.entry_id
        for run in runs(dsn)
        if run.worker == worker
        and run.finished_at is None
        and (started_after is None or run.started_at > started_after)
    )


def all_done(dsn: str, *, killed_before: Any = None) -> bool:
    """Every entry processed and no body running any more (runs of workers killed before
    ``killed_before`` never finish; they do not count)."""
    if unprocessed(dsn) != 0:
        return False
    return not [
        run
        for run in runs(dsn)
        if run.finished_at is None and (killed_before is None or run.started_at > killed_before)
    ]


def runs_per_entry(dsn: str) -> dict[int, int]:
    return dict(sorted(collections.Counter(run.entry_id for run in runs(dsn)).items()))


def lost_attempts(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT entry_id, attempt, worker, error FROM celery_reconciler.attempts "
            "WHERE outcome = 'lost' ORDER BY entry_id, attempt"
        ).fetchall()


def wait_seconds(seconds: float, *, why: str) -> None:
    """Let time pass (a window in which something must NOT happen); never an assertion."""
    until = time.monotonic() + seconds
    wait_for(lambda: time.monotonic() >= until, timeout_seconds=seconds + 5, what=why)


def assert_each_entry_ran_once(dsn: str) -> None:
    assert runs_per_entry(dsn) == dict.fromkeys(range(1, ENTRIES + 1), 1), (
        "entries whose body ran more than once (the rescue re-dispatched a live worker's work)"
    )
    assert audit.overlapping_runs(runs(dsn)) == []
    assert lost_attempts(dsn) == []


@pytest.mark.parametrize(
    "where", ["hostname_is_no_pod", "pod_in_another_namespace", "pod_labels_not_selected"]
)
def test_a_live_worker_the_operator_cannot_see_keeps_its_running_attempts(
    where: str,
    crds: devstack_kube.ControlPlane,
    node: devstack_node.Node,
    namespace: str,
    other_namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    """Setups the docs allow: such a worker is judged by its heartbeat alone. A worker
    outside Kubernetes is a local process; the other two are real Pods on the node."""
    seed_long_bodies(journal)
    # More slots than entries: a wrongly re-dispatched copy would run at once, side by side.
    pod: workers.WorkerPod | None = None
    if where == "hostname_is_no_pod":
        local_workers("outside-1", concurrency=2 * ENTRIES)
    else:
        elsewhere = where == "pod_in_another_namespace"
        pod = workers.start_worker_pod(
            node=node,
            namespace=other_namespace if elsewhere else namespace,
            pod_name="insights-worker-elsewhere" if elsewhere else "insights-worker-unselected",
            labels=WORKER_LABELS if elsewhere else {"app": "other"},
            broker_url=redis_url,
            dsn=journal,
            concurrency=2 * ENTRIES,
        )
    try:
        check_entries_run_once_by_an_unseen_worker(
            crds, namespace=namespace, journal=journal, redis_url=redis_url,
            start_operator=start_operator,
        )  # fmt: skip
    finally:
        # A Pod outlives its test unless deleted and waited for, and would take the next
        # test's messages from the shared Redis.
        if pod is not None:
            pod.delete(grace_seconds=1, wait=True)


def check_entries_run_once_by_an_unseen_worker(
    crds: devstack_kube.ControlPlane,
    *,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    start_operator()
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        lease_timeout=LEASE,
        sweep_interval=SWEEP_INTERVAL,
    )
    wait_for(
        lambda: all_done(journal),
        timeout_seconds=90,
        what="every entry processed and no body running",
        interval=1.0,
    )
    assert_each_entry_ran_once(journal)


def operator_rbac(kube: devstack_kube.ControlPlane, *, namespace: str) -> list[dict[str, Any]]:
    """The chart's own RBAC for an operator serving ``namespace`` (helm template, standalone):
    its ServiceAccount, ClusterRole(Binding) and Role(Binding), nothing else."""
    rendered = kube.helm(
        "template", f"rbac-{namespace}", str(CHART), "-n", namespace,
        "--set-json", f"watch.namespaces={json.dumps([namespace])}",
        "--set", "peering.enabled=false",
    ).stdout  # fmt: skip
    fullname = f"rbac-{namespace}-celery-reconciler"
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    return [
        doc
        for doc in yaml.safe_load_all(rendered)
        if doc and doc["kind"] in kinds and doc["metadata"]["name"] == fullname
    ]


def without_pod_rights(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    changed = []
    for doc in docs:
        if doc["kind"] == "Role":
            rules = [rule for rule in doc["rules"] if "pods" not in rule.get("resources", [])]
            assert len(rules) == len(doc["rules"]) - 1, "the chart's Role has one pods rule"
            doc = {**doc, "rules": rules}
        changed.append(doc)
    return changed


def apply_docs(kube: devstack_kube.ControlPlane, docs: list[dict[str, Any]]) -> None:
    kube.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )


def may_list_pods(kube: devstack_kube.ControlPlane, *, config: Path, namespace: str) -> bool:
    return (
        kube.kubectl("-n", namespace, "get", "pods", kubeconfig=config, check=False).returncode == 0
    )


def test_a_pod_watch_failing_for_a_minute_takes_no_running_attempt_away(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
    tmp_path: Path,
) -> None:
    """The operator runs under the chart's RBAC; the test takes its pods rights away for a
    minute (the watch fails with 403, its pod list goes stale) while a new worker pod starts
    long bodies, then gives them back."""
    rbac = operator_rbac(crds, namespace=namespace)
    fullname = f"rbac-{namespace}-celery-reconciler"
    apply_docs(crds, rbac)
    try:
        config = crds.service_account_kubeconfig(
            namespace=namespace, service_account=fullname, path=tmp_path / "sa.kubeconfig"
        )
        start_operator(kubeconfig=config, namespaces=(namespace,))
        apply_policy(
            crds,
            namespace,
            dsn=journal,
            broker_url=redis_url,
            lease_timeout=LEASE,
            sweep_interval=SWEEP_INTERVAL,
        )
        wait_for(
            lambda: (
                crds.kubectl(
                    "-n", namespace, "get", "processingstatus", "journal-insights", check=False
                ).returncode
                == 0
            ),
            timeout_seconds=60,
            what="the operator's first sweep (ProcessingStatus written)",
        )
        apply_docs(crds, without_pod_rights(rbac))
        broken = time.monotonic()
        wait_for(
            lambda: not may_list_pods(crds, config=config, namespace=namespace),
            timeout_seconds=30,
            what="the operator's token refused pods",
        )
        # The watch streams for at most 5 s at a time; by now its re-list has been refused.
        wait_seconds(7, why="the pod watch to fail")
        worker_pods("insights-worker-late", concurrency=2 * ENTRIES)
        seed_long_bodies(journal)
        wait_for(
            lambda: all_done(journal),
            timeout_seconds=75,
            what="every entry processed and no body running",
            interval=1.0,
        )
        wait_seconds(max(0.0, 60 - (time.monotonic() - broken)), why="a minute of failing watch")
        apply_docs(crds, rbac)
        wait_for(
            lambda: may_list_pods(crds, config=config, namespace=namespace),
            timeout_seconds=30,
            what="the operator's token allowed pods again",
        )
        wait_seconds(8, why="the watch to re-list and a few sweeps to run")
    finally:
        crds.kubectl("delete", "clusterrole,clusterrolebinding", fullname, check=False)
    assert_each_entry_ran_once(journal)


def test_a_same_name_pod_restart_rescues_only_the_old_process_attempts(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    """Worker A runs two long bodies and is killed; its container's replacement A' — same
    pod, name and uid — starts the other two; the kubelet's restart report arrives ~6 s
    later (restartCount 1, startedAt just before A' started). Only A's two are rescued."""
    pod = "insights-worker-a"
    workers.register_pod(crds, namespace=namespace, name=pod, labels=WORKER_LABELS)
    env = workers.downward_api_env(crds, namespace=namespace, name=pod)
    seed_long_bodies(journal, seconds=20)
    first = local_workers(pod, concurrency=2, extra_env=env)
    start_operator()
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        lease_timeout=LEASE,
        sweep_interval=SWEEP_INTERVAL,
    )
    orphans = wait_for(
        lambda: len(found := unfinished_runs(journal, worker=pod)) == 2 and found,
        timeout_seconds=60,
        what="A running two bodies",
    )
    clear_faults(journal, orphans)  # their rescued runs are quick; A' bodies stay long
    first.kill()
    killed_at = database_now(journal)
    restarted_at = workers.kubernetes_now()
    local_workers(pod, concurrency=2 * ENTRIES, extra_env=env)
    replacement = wait_for(
        lambda: (
            len(found := unfinished_runs(journal, worker=pod, started_after=killed_at)) == 2
            and found
        ),
        timeout_seconds=60,
        what="A' running the other two bodies",
    )
    wait_seconds(6, why="the kubelet's restart report to lag behind A'")
    workers.report_running(
        crds, namespace=namespace, name=pod, restart_count=1, started_at=restarted_at
    )
    wait_for(
        lambda: all_done(journal, killed_before=killed_at),
        timeout_seconds=75,
        what="every entry processed and no body of A' running",
        interval=1.0,
    )

    expected = {entry_id: 2 if entry_id in orphans else 1 for entry_id in range(1, ENTRIES + 1)}
    assert runs_per_entry(journal) == expected, (
        f"A' bodies {replacement} must run once; A's {orphans} twice (killed, then rescued)"
    )
    assert audit.overlapping_runs(runs(journal), killed_at={pod: killed_at}) == []
    assert sorted(row[0] for row in lost_attempts(journal)) == [str(e) for e in orphans]


def test_a_rescue_after_a_postgresql_restart_still_happens_within_seconds(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    postgres: devstack_postgres.PostgresServer,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    """One pod kill is rescued; PostgreSQL restarts; a second pod kill must be rescued as
    quickly (the lease is 10 minutes), although every connection the operator held died."""
    seed_long_bodies(journal, seconds=600)
    first = worker_pods("insights-worker-a", concurrency=2)
    second = worker_pods("insights-worker-b", concurrency=2)
    start_operator()
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        lease_timeout=LEASE,
        sweep_interval=SWEEP_INTERVAL,
    )
    wait_for(
        lambda: (
            len(unfinished_runs(journal, worker="insights-worker-a")) == 2
            and len(unfinished_runs(journal, worker="insights-worker-b")) == 2
        ),
        timeout_seconds=60,
        what="both workers running two hanging bodies each",
    )
    clear_faults(journal, list(range(1, ENTRIES + 1)))
    worker_pods("insights-worker-c", concurrency=ENTRIES)

    killed = {"insights-worker-a": kill_for_a_restart(journal, first)}
    wait_for(
        lambda: unprocessed(journal) == 2,
        timeout_seconds=30,
        what="the first rescue (worker a's two entries re-run)",
    )

    postgres.stop()
    postgres.start()
    wait_seconds(8, why="the operator's sweeps to meet the restarted database")
    killed["insights-worker-b"] = kill_for_a_restart(journal, second)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=45,
        what="the second rescue after the PostgreSQL restart (the lease has 10 minutes to go)",
    )
    assert runs_per_entry(journal) == dict.fromkeys(range(1, ENTRIES + 1), 2)
    assert audit.overlapping_runs(runs(journal), killed_at=killed) == []


def kill_for_a_restart(journal: str, worker: workers.WorkerPod) -> object:
    """SIGKILL the main process of the worker Pod's container; the kubelet restarts it and
    reports the restart. Returns the database's time of the kill."""
    worker.kill()
    return database_now(journal)
