"""The chart installed as a user installs it, running as real Pods of the image on a real node.

``helm install`` runs the operator in cluster — it authenticates with its projected
ServiceAccount token, kopf serves the liveness and readiness probes the kubelet calls — and
the demo workers as the chart's Deployment. Then the failures the product exists for happen
for real: the kubelet restarts a worker container killed with SIGKILL, ``kubectl delete
pod`` makes the ReplicaSet replace a worker, ``kubectl rollout restart`` replaces them all
mid-run, the operator's own container is killed. Every count comes from the database.

The test bed's chart values, and why each departs from the defaults, are in
``devstack.node.chart_flags``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from e2e_support import (
    PERMISSION_ERROR,
    adopt_crds,
    apply_policy,
    apply_secrets,
    get_json,
    ledger_rows,
    seed,
    tally,
    unprocessed,
    wait_for,
)

from celery_app.demo import schema
from celery_reconciler import replica_proof
from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import processes

pytestmark = pytest.mark.e2e

RELEASE = "incluster"
FULLNAME = f"{RELEASE}-celery-reconciler"
WORKERS = f"{FULLNAME}-demo-worker"
WORKER_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=demo-worker"
OPERATOR_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
CHART = devstack_kube.ROOT / "charts" / "celery-reconciler"


@contextlib.contextmanager
def installed(
    node: devstack_node.Node,
    *,
    namespace: str,
    dsn: str,
    broker_url: str,
    workers: int = 2,
    extra_values: tuple[str, ...] = (),
) -> Iterator[None]:
    """Secrets first (the workers' env needs them), then ``helm install``, then wait until
    the operator Pod is Ready (its readiness probe passes) and every worker is up."""
    kube = node.plane
    apply_secrets(kube, namespace, dsn=dsn, broker_url=broker_url)
    adopt_crds(kube, release=RELEASE, namespace=namespace)
    kube.helm(
        "install", RELEASE, str(CHART), "-n", namespace,
        *devstack_node.chart_flags(
            node,
            watch_namespace=namespace,
            workers=workers,
            health_port=processes.free_port(),
            metrics_port=processes.free_port(),
            broker_secret=("demo-broker", "url"),
            database_secret=("demo-db", "dsn"),
        ),
        *extra_values,
    )  # fmt: skip
    try:
        for deployment in (FULLNAME, WORKERS):
            kube.kubectl(
                "-n", namespace, "rollout", "status", f"deployment/{deployment}", "--timeout=180s"
            )  # fmt: skip
        yield
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout=60s", check=False)


def pods(kube: devstack_kube.ControlPlane, namespace: str, selector: str) -> list[dict[str, Any]]:
    """Pods of a selector that are not being deleted, oldest first."""
    items = get_json(kube, "-n", namespace, "get", "pods", "-l", selector)["items"]
    live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    return sorted(live, key=lambda p: p["metadata"]["creationTimestamp"])


def restarts(kube: devstack_kube.ControlPlane, namespace: str, pod: str) -> int:
    status = get_json(kube, "-n", namespace, "get", "pod", pod)["status"]
    return int(status["containerStatuses"][0]["restartCount"])


def ready(kube: devstack_kube.ControlPlane, namespace: str, pod: str) -> bool:
    conditions = get_json(kube, "-n", namespace, "get", "pod", pod)["status"].get("conditions")
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions or [])


def operator_log(node: devstack_node.Node, namespace: str) -> str:
    (operator,) = pods(node.plane, namespace, OPERATOR_SELECTOR)
    return node.container_log(
        namespace=namespace, pod=operator["metadata"]["name"], container="operator"
    )


def hang(dsn: str, entry_ids: range) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for entry_id in entry_ids:
            schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=600)


def unhang(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM demo_faults WHERE kind = 'sleep' AND seconds >= 600")


def test_helm_install_runs_the_operator_in_cluster_and_helm_test_passes(
    node: devstack_node.Node, crds: devstack_kube.ControlPlane, namespace: str, journal: str,
    redis_url: str,
) -> None:  # fmt: skip
    seed(journal, 40)
    with installed(node, namespace=namespace, dsn=journal, broker_url=redis_url):
        apply_policy(crds, namespace, dsn=journal, broker_url=redis_url)
        wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="40 processed")
        (operator,) = pods(crds, namespace, OPERATOR_SELECTOR)
        name = operator["metadata"]["name"]
        # The in-cluster client's credentials: the kubelet's projected ServiceAccount token.
        assert operator["spec"]["serviceAccountName"] == FULLNAME
        projected = [v for v in operator["spec"]["volumes"] if "projected" in v]
        assert any(
            "serviceAccountToken" in source
            for volume in projected
            for source in volume["projected"]["sources"]
        ), operator["spec"]["volumes"]
        # Both probes are kopf's /healthz, called by the kubelet: Ready and never restarted.
        assert ready(crds, namespace, name)
        assert restarts(crds, namespace, name) == 0
        tested = crds.helm("test", RELEASE, "-n", namespace, "--timeout", "120s")
        assert "Phase:          Succeeded" in tested.stdout, tested.stdout
        counted = tally(journal)
        assert (counted.processed, counted.duplicate_successes) == (40, 0)
        log = operator_log(node, namespace)
        assert [line for line in log.splitlines() if PERMISSION_ERROR.search(line)] == []


def test_the_sharded_chart_sweeps_under_leases_in_cluster(
    node: devstack_node.Node, crds: devstack_kube.ControlPlane, namespace: str, journal: str,
    redis_url: str,
) -> None:  # fmt: skip
    """``sharding.enabled``: the operator Pod renews its member Lease and takes the policy's
    Lease with its own ServiceAccount token (the chart's Role), and sweeps under it. One
    replica: on one node without a pod network, two would compete for the host's ports
    (``tests/e2e/test_sharding.py`` runs three, out of cluster)."""
    seed(journal, 40)
    sharded = ("--set", "sharding.enabled=true", "--set", "sharding.leaseSeconds=9")
    with installed(
        node, namespace=namespace, dsn=journal, broker_url=redis_url, extra_values=sharded
    ):
        apply_policy(crds, namespace, dsn=journal, broker_url=redis_url)
        wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="40 processed")
        (operator,) = pods(crds, namespace, OPERATOR_SELECTOR)
        name = operator["metadata"]["name"]
        held = {
            lease["metadata"]["name"]: lease["spec"].get("holderIdentity", "")
            for lease in get_json(crds, "-n", namespace, "get", "leases")["items"]
        }
        assert held[f"{FULLNAME}-member-{name}"].startswith(f"{name}/")
        policy_leases = [
            holder for lease, holder in held.items() if lease.startswith(f"{FULLNAME}-policy-")
        ]
        assert [holder.partition("/")[0] for holder in policy_leases] == [name]
        with psycopg.connect(journal, autocommit=True) as conn:
            owner = conn.execute(
                "SELECT holder FROM celery_reconciler.policy_owners WHERE policy_key = %s",
                [f"{namespace}/journal-insights"],
            ).fetchone()
        assert owner is not None and owner[0] == policy_leases[0]
        log = operator_log(node, namespace)
        assert [line for line in log.splitlines() if PERMISSION_ERROR.search(line)] == []
        assert "Lease not taken" not in log
        # Its member Lease carries its Pod's proof (the Downward API's POD_UID), which its own
        # check, against the chart's --replica-selector, passes.
        member = get_json(crds, "-n", namespace, "get", "lease", f"{FULLNAME}-member-{name}")
        assert member["metadata"]["annotations"] == {
            replica_proof.POD_NAME_ANNOTATION: name,
            replica_proof.POD_UID_ANNOTATION: operator["metadata"]["uid"],
        }
        assert "does not count as a replica" not in log


@pytest.mark.parametrize("how", ["kill", "delete"])
def test_a_worker_pod_that_dies_for_real_has_its_entries_rescued(
    how: str, node: devstack_node.Node, crds: devstack_kube.ControlPlane, namespace: str,
    journal: str, redis_url: str,
) -> None:  # fmt: skip
    seed(journal, 2)
    hang(journal, range(1, 3))
    # One worker (concurrency 2) holds both entries, so every entry in flight is the victim's.
    with installed(node, namespace=namespace, dsn=journal, broker_url=redis_url, workers=1):
        # The lease is 10 minutes and sweeps an hour apart: only the pod hook can rescue.
        apply_policy(
            crds, namespace, dsn=journal, broker_url=redis_url, lease_timeout="10m",
            sweep_interval="1h",
        )  # fmt: skip
        held = wait_for(
            lambda: len(rows := ledger_rows(journal, state="running")) == 2 and rows,
            timeout_seconds=90,
            what="the worker to be running both entries",
        )
        victim = str(held[0][2])
        assert {row[2] for row in held} == {victim}
        # A held body may be between its ledger start and its read of demo_faults: the
        # faults go only once the worker is being killed, so both bodies are sure to hang.
        if how == "kill":
            node.kill_container(namespace=namespace, pod=victim, container="worker")
            unhang(journal)
            wait_for(
                lambda: restarts(crds, namespace, victim) == 1,
                timeout_seconds=60,
                what=f"the kubelet to restart {victim}'s container",
            )
        else:
            crds.kubectl(
                "-n", namespace, "delete", "pod", victim, "--grace-period=2", "--wait=false"
            )  # fmt: skip
            unhang(journal)
            wait_for(
                lambda: len(names := {p["metadata"]["name"] for p in pods(
                    crds, namespace, WORKER_SELECTOR)}) == 1 and victim not in names,
                timeout_seconds=60,
                what="the ReplicaSet to replace the deleted worker",
            )  # fmt: skip
        wait_for(
            lambda: unprocessed(journal) == 0,
            timeout_seconds=120,
            what="the dead worker's entries to be rescued (lease: 10 minutes)",
        )
        status = get_json(crds, "-n", namespace, "get", "processingstatus", "journal-insights")
        last_rescue = wait_for(
            lambda: get_json(crds, "-n", namespace, "get", "processingstatus", "journal-insights")[
                "status"
            ].get("lastRescue"),
            timeout_seconds=30,
            what="lastRescue in ProcessingStatus",
        )
        assert last_rescue["pod"] == victim, status
        assert last_rescue["count"] == len(held)
        counted = tally(journal)
        assert (counted.processed, counted.duplicate_successes) == (2, 0)


def test_rollout_restart_of_the_workers_mid_run_loses_nothing(
    node: devstack_node.Node, crds: devstack_kube.ControlPlane, namespace: str, journal: str,
    redis_url: str,
) -> None:  # fmt: skip
    entries = 300
    seed(journal, entries)
    with psycopg.connect(journal, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO demo_faults (entry_id, kind, seconds) "
            "SELECT id, 'sleep', 0.05 FROM journal_entry"
        )
    with installed(node, namespace=namespace, dsn=journal, broker_url=redis_url):
        before = {p["metadata"]["name"] for p in pods(crds, namespace, WORKER_SELECTOR)}
        apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="10s")
        wait_for(
            lambda: tally(journal).processed >= entries // 4,
            timeout_seconds=120,
            what="a quarter of the entries processed",
        )
        crds.kubectl("-n", namespace, "rollout", "restart", f"deployment/{WORKERS}")
        crds.kubectl(
            "-n", namespace, "rollout", "status", f"deployment/{WORKERS}", "--timeout=180s"
        )  # fmt: skip
        after = {p["metadata"]["name"] for p in pods(crds, namespace, WORKER_SELECTOR)}
        assert before.isdisjoint(after), (before, after)
        wait_for(
            lambda: unprocessed(journal) == 0,
            timeout_seconds=240,
            what="every entry processed after the rollout",
        )
        counted = tally(journal)
        assert (counted.entries, counted.processed, counted.duplicate_successes) == (
            entries,
            entries,
            0,
        )
        print(f"rollout restart mid-run: {counted.runs} body runs for {entries} entries")


def test_the_operator_container_killed_is_restarted_and_carries_on(
    node: devstack_node.Node, crds: devstack_kube.ControlPlane, namespace: str, journal: str,
    redis_url: str,
) -> None:  # fmt: skip
    seed(journal, 20)
    with installed(node, namespace=namespace, dsn=journal, broker_url=redis_url, workers=1):
        apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="5s")
        wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="20 processed")
        (operator,) = pods(crds, namespace, OPERATOR_SELECTOR)
        name = operator["metadata"]["name"]
        node.kill_container(namespace=namespace, pod=name, container="operator")
        wait_for(
            lambda: restarts(crds, namespace, name) == 1 and ready(crds, namespace, name),
            timeout_seconds=120,
            what="the kubelet to restart the operator and its readiness probe to pass",
        )
        # New work after the restart is found by the restarted operator's sweeps alone.
        with psycopg.connect(journal, autocommit=True) as conn:
            schema.seed(conn, count=20)
        wait_for(
            lambda: unprocessed(journal) == 0,
            timeout_seconds=120,
            what="entries added after the restart to be processed",
        )
        counted = tally(journal)
        assert counted.processed == counted.entries
        assert counted.duplicate_successes == 0
