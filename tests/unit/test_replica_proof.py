"""Which member Leases count (``replica_proof.judge``): only one a running replica Pod of
the Deployment wrote — its own member Lease, held by a process of that Pod, whose Pod exists
with the replica labels, that uid, not terminating, not finished (issue 22)."""

from __future__ import annotations

import dataclasses

import pytest

from celery_reconciler import replica_proof, sharding

SELECTOR = {
    "app.kubernetes.io/name": "celery-reconciler",
    "app.kubernetes.io/component": "operator",
}


def lease_name(pod_name: str) -> str:
    return f"group-member-{pod_name}"


def pod(name: str = "op-1", **changes: object) -> replica_proof.ReplicaPod:
    base = replica_proof.ReplicaPod(
        name=name, uid=f"uid-{name}", labels={**SELECTOR, "pod-template-hash": "abc"},
        terminating=False, phase="Running",
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def lease(pod_name: str = "op-1", **changes: object) -> sharding.LeaseRecord:
    base = sharding.LeaseRecord(
        name=lease_name(pod_name), holder=f"{pod_name}/1a2b", duration_seconds=15,
        transitions=0, resource_version="7", pod_name=pod_name, pod_uid=f"uid-{pod_name}",
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def judge(
    records: list[sharding.LeaseRecord], pods: list[replica_proof.ReplicaPod]
) -> replica_proof.Verdict:
    return replica_proof.judge(records, pods, selector=SELECTOR, member_lease_name=lease_name)


def test_a_lease_written_by_a_running_replica_counts() -> None:
    verdict = judge([lease("op-1"), lease("op-2")], [pod("op-1"), pod("op-2")])
    assert [record.name for record in verdict.counted] == [lease_name("op-1"), lease_name("op-2")]
    assert verdict.ignored == {}


def test_a_pending_pod_still_counts() -> None:
    """Its process may write its Lease before the kubelet reports the Pod Running."""
    assert judge([lease()], [pod(phase="Pending")]).ignored == {}


def test_a_released_lease_needs_no_proof() -> None:
    """No holder: no member whatever it says (a replica that left)."""
    released = lease(holder=None, pod_name=None, pod_uid=None)
    assert judge([released], []).counted == (released,)


@pytest.mark.parametrize(
    ("record", "pods", "why"),
    [
        (lease(pod_name=None, pod_uid=None), [pod()], "names no replica Pod"),
        (lease(pod_uid=None), [pod()], "names no replica Pod"),
        (lease(), [], "no Pod of that name carries the replica labels"),
        (lease(), [pod(labels={"app.kubernetes.io/name": "celery-reconciler"})], "replica labels"),
        (lease(), [pod(uid="uid-new")], "a Pod since replaced under the same name"),
        (lease(), [pod(terminating=True)], "is terminating"),
        (lease(), [pod(phase="Succeeded")], "has finished (Succeeded)"),
        (lease(), [pod(phase="Failed")], "has finished (Failed)"),
        (lease(holder="evil/1"), [pod()], "its holder evil/1 is not a process of Pod op-1"),
        # A real replica's proof copied onto another Lease: one Pod backs one Lease.
        (lease(name="group-member-evil"), [pod()], "whose member Lease is group-member-op-1"),
    ],
)
def test_a_lease_failing_the_check_is_ignored_with_the_reason(
    record: sharding.LeaseRecord, pods: list[replica_proof.ReplicaPod], why: str
) -> None:
    verdict = judge([record, lease("op-2")], [*pods, pod("op-2")])
    assert [counted.name for counted in verdict.counted] == [lease_name("op-2")]
    assert list(verdict.ignored) == [record.name]
    assert why in verdict.ignored[record.name]


def test_the_selector_is_parsed_from_matchlabels_text() -> None:
    assert replica_proof.parse_selector("a=1, b.io/c=x-y,") == {"a": "1", "b.io/c": "x-y"}
    assert replica_proof.parse_selector("") == {}
    for bad in ("a", "a!=1", "=1", "a=1=2"):
        with pytest.raises(ValueError, match="not a key=value label"):
            replica_proof.parse_selector(bad)


def test_the_identity_writes_what_the_check_reads() -> None:
    identity = replica_proof.Identity(pod_name="op-1", pod_uid="uid-op-1", selector=SELECTOR)
    annotations = identity.annotations()
    record = lease(
        pod_name=annotations[replica_proof.POD_NAME_ANNOTATION],
        pod_uid=annotations[replica_proof.POD_UID_ANNOTATION],
    )
    assert judge([record], [pod()]).ignored == {}
    assert replica_proof.parse_selector(identity.selector_text()) == SELECTOR
