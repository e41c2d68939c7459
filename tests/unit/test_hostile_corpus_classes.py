"""The annotation class of the hostile corpus (``tests/e2e/hostile_corpus.ANNOTATION_CASES``)
against the operator's own validation: what it acts on and what it removes with a Warning
Event. The loop's handling of a removed one (the Event, the policy sweeping on) is
``tests/e2e/test_hostile_annotations.py``. The Lease class (``LEASE_CASES``) against
``replica_proof``'s judgement; ``tests/e2e/test_fake_member_lease.py`` applies them all
beside two real replicas."""

from __future__ import annotations

import pytest

from celery_reconciler import policy_annotations, replica_proof, sharding
from tests.e2e.hostile_corpus import ANNOTATION_CASES, LEASE_CASES, AnnotationCase, LeaseCase


def acted_on(case: AnnotationCase) -> bool:
    if case.key == policy_annotations.RETRY_DEAD:
        try:
            policy_annotations.parse_retry_dead(case.value)
        except policy_annotations.InvalidAnnotation as error:
            assert policy_annotations.RETRY_DEAD in str(error)  # the Event names it
            assert "\x00" not in str(error) and "\x1b" not in str(error)
            return False
        return True
    assert case.key == policy_annotations.DIFFBASE
    problem = policy_annotations.diffbase_problem(case.value)
    assert problem is None or policy_annotations.DIFFBASE in problem
    return problem is None


@pytest.mark.parametrize("case", ANNOTATION_CASES, ids=lambda case: case.name)
def test_each_hostile_annotation_is_acted_on_or_removed_as_the_corpus_says(
    case: AnnotationCase,
) -> None:
    assert acted_on(case) == (case.expect == "acted on")


LEASE_REPLICAS = ("replica-a", "replica-b")
LEASE_SELECTOR = {"app.kubernetes.io/component": "operator"}


def lease_name(pod_name: str) -> str:
    return f"group-member-{pod_name}"


@pytest.mark.parametrize("case", LEASE_CASES, ids=lambda case: case.name)
def test_each_hostile_member_lease_is_ignored_for_the_reason_the_corpus_says(
    case: LeaseCase,
) -> None:
    uids = {name: f"uid-{name}" for name in LEASE_REPLICAS}
    pods = [
        replica_proof.ReplicaPod(
            name=name, uid=uid, labels=LEASE_SELECTOR, terminating=False, phase="Running"
        )
        for name, uid in uids.items()
    ]
    annotations = case.annotations(uids=uids)
    fake = sharding.LeaseRecord(
        name=lease_name(case.lease_of),
        holder=case.holder,
        duration_seconds=3600,
        transitions=0,
        resource_version="1",
        pod_name=annotations.get(replica_proof.POD_NAME_ANNOTATION),
        pod_uid=annotations.get(replica_proof.POD_UID_ANNOTATION),
    )
    assert case.lease_of not in LEASE_REPLICAS  # applied beside the replicas' own Leases
    replicas = [
        sharding.LeaseRecord(
            name=lease_name(name),
            holder=f"{name}/1",
            duration_seconds=6,
            transitions=0,
            resource_version="1",
            pod_name=name,
            pod_uid=uid,
        )
        for name, uid in uids.items()
    ]
    verdict = replica_proof.judge(
        [*replicas, fake], pods, selector=LEASE_SELECTOR, member_lease_name=lease_name
    )
    assert verdict.counted == tuple(replicas)
    assert case.why in verdict.ignored[fake.name]
