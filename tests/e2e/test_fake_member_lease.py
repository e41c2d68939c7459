"""A fake member Lease does not stop the policies assigned to it (issue 22).

With ``--sharding-namespace`` the replicas share the policies among the holders of the
member Leases in that namespace. Anyone with ``edit`` there could add a Lease that looks like
a member: the issue's run saw 3 of 6 policies stop being swept for as long as it was
renewed, all still ``Ready=True``. Now a replica that runs in a Pod proves it on its member
Lease, and counts only Leases whose Pod exists with the replica labels and that uid.

The replicas run as local processes (so the other sharding tests can SIGKILL them); each
is given the identity of a real Pod the test creates on the test bed's node, through the
same Downward API variables the chart sets (``POD_NAME``, ``POD_UID``), and the chart's
``--replica-selector``. The hostile corpus's fake member Leases (``LEASE_CASES``: no proof,
a Pod that does not exist, a real replica's proof copied onto another Lease...) are added
while two replicas share six policies. Entries added afterwards are all processed, every
policy keeps being swept by a real replica, and each fake Lease is named in a Warning Event
and a log line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sharded_app
from e2e_support import OperatorProcess, apply_secrets, get_json, wait_for
from hostile_corpus import LEASE_CASES
from test_sharding import GROUP, lease_holders, shard_policy

from celery_reconciler import leases, ledger
from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import workers

E2E = Path(__file__).resolve().parent
REPLICAS = ("replica-a", "replica-b")
POLICIES = range(1, 7)
LEASE_SECONDS = 6
ENTRIES_PER_POLICY = 10
# The chart's selector labels for a release named "fake-lease-test".
REPLICA_LABELS = {
    "app.kubernetes.io/name": "celery-reconciler",
    "app.kubernetes.io/instance": "fake-lease-test",
    "app.kubernetes.io/component": "operator",
}
SELECTOR = ",".join(f"{key}={value}" for key, value in REPLICA_LABELS.items())


def replica_pod(name: str, node: devstack_node.Node) -> dict[str, Any]:
    """A Pod standing for an operator replica: the replica labels, the pause container."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {**REPLICA_LABELS, "pod-template-hash": "test"}},
        "spec": {
            "nodeName": node.name,
            "hostNetwork": True,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "operator",
                    "image": "registry.k8s.io/pause:3.10",
                    "imagePullPolicy": "Never",
                }
            ],
        },
    }


@pytest.fixture
def replica_pods(
    crds: devstack_kube.ControlPlane, node: devstack_node.Node, namespace: str
) -> Iterator[dict[str, str]]:
    """Pod name -> uid of a running Pod for each replica."""
    items = [replica_pod(name, node) for name in REPLICAS]
    crds.kubectl(
        "-n", namespace, "apply", "-f", "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
    )  # fmt: skip

    def running() -> dict[str, str] | None:
        listed = get_json(crds, "-n", namespace, "get", "pods", "-l", SELECTOR)["items"]
        phases = {pod["metadata"]["name"]: pod.get("status", {}).get("phase") for pod in listed}
        if phases != dict.fromkeys(REPLICAS, "Running"):
            return None
        return {pod["metadata"]["name"]: pod["metadata"]["uid"] for pod in listed}

    yield wait_for(running, timeout_seconds=90, what=f"the replica Pods {REPLICAS} Running")
    crds.kubectl(
        "-n", namespace, "delete", "pods", *REPLICAS, "--grace-period=1", "--wait=true",
        check=False,
    )  # fmt: skip


def fake_member_lease(name: str, *, holder: str, annotations: dict[str, str]) -> dict[str, Any]:
    """What someone with ``edit`` may apply: a member Lease renewed for an hour."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": {leases.MEMBER_LABEL: GROUP},
            "annotations": annotations,
        },
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600},
    }


def unprocessed(conn: psycopg.Connection[Any]) -> int:
    total = 0
    for index in POLICIES:
        row = conn.execute(
            f"SELECT count(*) FROM {sharded_app.table_name(index)} WHERE NOT done"  # noqa: S608
        ).fetchone()
        total += row[0] if row else 0
    return total


def swept_since(conn: psycopg.Connection[Any], since: Any) -> dict[str, str]:
    """policy key -> the replica of a sweep that began after ``since`` (the ledger's clock)."""
    return dict(
        conn.execute(
            "SELECT DISTINCT ON (policy_key) policy_key, split_part(holder, '/', 1) "
            "FROM celery_reconciler.sweeps WHERE started_at > %s ORDER BY policy_key, started_at",
            [since],
        ).fetchall()
    )


def lease_events(kube: devstack_kube.ControlPlane, namespace: str, name: str) -> list[str]:
    events = get_json(
        kube, "-n", namespace, "get", "events", "--field-selector",
        f"involvedObject.kind=Lease,involvedObject.name={name}",
    )["items"]  # fmt: skip
    return [
        event["message"]
        for event in events
        if event["reason"] == "MemberLeaseIgnored" and event["type"] == "Warning"
    ]


def test_a_fake_member_lease_stops_no_policy_and_is_named_in_an_event(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    database_dsn: str,
    redis_url: str,
    tmp_path: Path,
    replica_pods: dict[str, str],
    start_operator: Callable[..., OperatorProcess],
) -> None:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        sharded_app.create_tables(conn)
        ledger.ensure_schema(conn)
    worker = workers.start_worker(
        pod_name="shard-worker",
        broker_url=redis_url,
        dsn=database_dsn,
        log_dir=tmp_path,
        concurrency=2,
        app="sharded_app",
        queue=sharded_app.QUEUE,
        extra_env={"PYTHONPATH": str(E2E)},
    )
    try:
        run_scenario(crds, namespace, database_dsn, redis_url, replica_pods, start_operator)
    finally:
        worker.stop(timeout_seconds=20)


def run_scenario(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    dsn: str,
    redis_url: str,
    replica_pods: dict[str, str],
    start_operator: Callable[..., OperatorProcess],
) -> None:
    operators = {
        name: start_operator(
            name=name,
            sharding_namespace=namespace,
            extra_args=[f"--lease-seconds={LEASE_SECONDS}", f"--replica-selector={SELECTOR}"],
            extra_env={"POD_NAME": name, "POD_UID": replica_pods[name]},
        )
        for name in REPLICAS
    }
    wait_for(
        lambda: set(lease_holders(crds, namespace, leases.MEMBER_LABEL).values()) == set(REPLICAS),
        timeout_seconds=60,
        what="a member Lease held by each of the two replicas",
    )
    apply_secrets(crds, namespace, dsn=dsn, broker_url=redis_url)
    policies = [shard_policy(index) for index in POLICIES]
    crds.kubectl(
        "-n", namespace, "apply", "-f", "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": policies}),
    )  # fmt: skip
    wait_for(
        lambda: len(lease_holders(crds, namespace, leases.POLICY_LABEL)) == len(POLICIES),
        timeout_seconds=90,
        what="every policy Lease held by a replica",
    )

    # The hostile corpus's Lease class: no proof, a Pod that does not exist, a replica's
    # proof copied onto another Lease, a replica's Pod named under another holder.
    fakes = {leases.object_name(GROUP, "member", case.lease_of): case for case in LEASE_CASES}
    crds.kubectl(
        "-n", namespace, "apply", "-f", "-",
        input=json.dumps({
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                fake_member_lease(
                    name, holder=case.holder, annotations=case.annotations(uids=replica_pods)
                )
                for name, case in fakes.items()
            ],
        }),
    )  # fmt: skip

    with psycopg.connect(dsn, autocommit=True) as conn:
        # Two rounds of work: the second arrives once the first is done, long after every
        # replica has listed the fake Leases (a listing follows a new holder at once).
        for round_number in (1, 2):
            since = conn.execute("SELECT clock_timestamp()").fetchone()
            assert since is not None
            sharded_app.add_entries(conn, per_table=ENTRIES_PER_POLICY)
            wait_for(
                lambda: unprocessed(conn) == 0,
                timeout_seconds=120,
                what=f"every entry of round {round_number} processed with the fake Leases there",
            )
            swept = wait_for(
                lambda: (
                    len(found := swept_since(conn, since[0])) == len(POLICIES) and found  # noqa: B023
                ),
                timeout_seconds=60,
                what=f"a sweep of every policy after round {round_number} began",
            )
            print(f"round {round_number}: swept by {dict(sorted(swept.items()))}")
            assert set(swept.values()) <= set(REPLICAS)

    held = lease_holders(crds, namespace, leases.POLICY_LABEL)
    assert sorted(set(held.values())) == sorted(REPLICAS), held
    for fake, case in fakes.items():
        messages = wait_for(
            lambda: lease_events(crds, namespace, fake),  # noqa: B023
            timeout_seconds=30,
            what=f"a Warning Event naming the fake member Lease {fake} ({case.name})",
        )
        print(f"Event on {fake} ({case.name}): {messages[0]}")
        assert all(f"{namespace}/{fake}" in message and case.why in message for message in messages)
        # Reported once by each replica that saw it, not at each listing.
        assert len(messages) <= len(REPLICAS), messages
        for name, operator in operators.items():
            log = operator.process.log_path.read_text()
            assert f"member Lease {namespace}/{fake} does not count" in log, name
    # The replicas' own Leases pass: nothing reported about them.
    for name in REPLICAS:
        assert lease_events(crds, namespace, leases.object_name(GROUP, "member", name)) == []
