"""Which member Leases count: only those a running replica of this Deployment wrote.

Sharding shares the policies out among the holders of the member Leases in the operator's
namespace. Whoever may write a Lease there (``edit`` in that namespace) could add one that
looks like a member; the policies assigned to that holder would then stop being swept for
as long as it is renewed, while every replica reports them fine (issue 22 saw 3 of 6).

So a replica that runs in a Pod writes its Pod's name and uid (from the Downward API) on
its member Lease, and every such replica counts a Lease as a member only when that proof
holds against the API server's Pods, listed with the replicas' labels:

* the Lease is the member Lease of that Pod (its name derives from the Pod's name, so one
  Pod backs one Lease: a copy of a real replica's proof on another Lease does not count);
* its holder is a process of that Pod (``<pod name>/<nonce>``);
* the Pod exists, carries the replica labels, has that uid (not a Pod since replaced under
  the same name), is not terminating and has not finished.

A free Lease (released: no holder) is no member whatever it says and needs no check.

What this does not stop: who may write Leases there may also create a Pod with the replica
labels and name it on a Lease. ``edit`` in the operator's namespace is operator-level
trust (``docs/operations.md``, Trust boundaries). The check stops stale and mistaken Leases
— a copied manifest, a careless ``kubectl apply``, a Lease left by a replica whose Pod is
gone — and makes each one visible instead of a silent stop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

from celery_reconciler import sharding

# The annotations a replica writes on its member Lease: its Pod, from the Downward API.
POD_NAME_ANNOTATION = "celery-reconciler.io/replica-pod"
POD_UID_ANNOTATION = "celery-reconciler.io/replica-pod-uid"


@dataclasses.dataclass(frozen=True)
class Identity:
    """This replica's Pod (the Downward API's ``POD_NAME``, ``POD_UID``) and the labels
    every replica's Pod carries."""

    pod_name: str
    pod_uid: str
    selector: Mapping[str, str]

    def annotations(self) -> dict[str, str]:
        return {POD_NAME_ANNOTATION: self.pod_name, POD_UID_ANNOTATION: self.pod_uid}

    def selector_text(self) -> str:
        return ",".join(f"{key}={value}" for key, value in sorted(self.selector.items()))


@dataclasses.dataclass(frozen=True)
class ReplicaPod:
    """What the check needs of a Pod in the operator's namespace."""

    name: str
    uid: str
    labels: Mapping[str, str]
    terminating: bool  # metadata.deletionTimestamp set
    phase: str | None


@dataclasses.dataclass(frozen=True)
class Verdict:
    counted: tuple[sharding.LeaseRecord, ...]
    ignored: Mapping[str, str]  # Lease name -> why it does not count


def judge(
    records: Iterable[sharding.LeaseRecord],
    pods: Iterable[ReplicaPod],
    *,
    selector: Mapping[str, str],
    member_lease_name: Callable[[str], str],
) -> Verdict:
    """Split the member Leases into those that count and those ignored, with the reason.

    ``member_lease_name(pod_name)``: the name of the member Lease a replica in that Pod
    writes. ``selector``: the labels every replica Pod carries."""
    by_name = {pod.name: pod for pod in pods}
    counted: list[sharding.LeaseRecord] = []
    ignored: dict[str, str] = {}
    for record in records:
        why = _why_not(record, by_name, selector=selector, member_lease_name=member_lease_name)
        if why is None:
            counted.append(record)
        else:
            ignored[record.name] = why
    return Verdict(counted=tuple(counted), ignored=ignored)


def _why_not(
    record: sharding.LeaseRecord,
    pods: Mapping[str, ReplicaPod],
    *,
    selector: Mapping[str, str],
    member_lease_name: Callable[[str], str],
) -> str | None:
    if record.holder is None:
        return None
    if not record.pod_name or not record.pod_uid:
        return (
            f"it names no replica Pod (annotations {POD_NAME_ANNOTATION} and "
            f"{POD_UID_ANNOTATION}), so no running replica is known to have written it"
        )
    pod_name = record.pod_name
    if record.name != member_lease_name(pod_name):
        return (
            f"it names Pod {pod_name}, whose member Lease is {member_lease_name(pod_name)}, "
            "not this one"
        )
    if sharding.replica_of(record.holder) != pod_name:
        return f"its holder {record.holder} is not a process of Pod {pod_name}"
    pod = pods.get(pod_name)
    if pod is None or any(pod.labels.get(key) != value for key, value in selector.items()):
        labels = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        return (
            f"it names Pod {pod_name}, but no Pod of that name carries the replica labels {labels}"
        )
    if pod.uid != record.pod_uid:
        return (
            f"it names Pod {pod_name} with uid {record.pod_uid}, but that Pod's uid is "
            f"{pod.uid} (a Pod since replaced under the same name)"
        )
    if pod.terminating:
        return f"its Pod {pod_name} is terminating"
    if pod.phase in ("Succeeded", "Failed"):
        return f"its Pod {pod_name} has finished ({pod.phase})"
    return None


def parse_selector(text: str) -> dict[str, str]:
    """``key=value,key=value`` (equality terms only, as a Deployment's matchLabels)."""
    selector: dict[str, str] = {}
    for term in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = term.partition("=")
        if not equals or not key.strip() or "!" in key or "=" in value:
            raise ValueError(f"{term!r} is not a key=value label")
        selector[key.strip()] = value.strip()
    return selector
