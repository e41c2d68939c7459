"""Kubernetes Lease I/O (coordination.k8s.io/v1) for active-active replicas.

The decisions are ``sharding``'s; this module only reads and writes the objects, in the
operator's own namespace:

    leases      get, list, watch, create, update
    pods        list (the replicas' own Pods, by their labels: ``replica_proof``)
    events      create (a member Lease that does not count, named once)

Every write that changes a holder is conditional on the resourceVersion read before it, so
the API server is the arbiter: of two replicas that try to take one Lease, one gets HTTP
409 (``LeaseConflict``) and reads again. The official client is synchronous; callers in the
event loop run these functions in threads (``membership``), the watch in one of its own.
"""

from __future__ import annotations

import datetime
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes

from celery_reconciler import kube, replica_proof, sharding, watching

MEMBER_LABEL = "celery-reconciler.io/member-of"
POLICY_LABEL = "celery-reconciler.io/policy-of"
POLICY_ANNOTATION = "celery-reconciler.io/policy"


class LeaseConflict(Exception):
    """Someone wrote the Lease since we read it (HTTP 409): read it again and decide anew."""


def _api() -> kubernetes.client.CoordinationV1Api:
    return kubernetes.client.CoordinationV1Api(kube._client())


def object_name(*parts: str) -> str:
    """A Lease name from free text (a pod or group name, a uid): a DNS subdomain."""
    name = re.sub(r"[^a-z0-9.-]+", "-", "-".join(parts).lower()).strip("-.")
    return name[:253].rstrip("-.") or "lease"


def _record(lease: Any) -> sharding.LeaseRecord:
    spec = lease.spec
    annotations = lease.metadata.annotations or {}
    return sharding.LeaseRecord(
        name=str(lease.metadata.name),
        holder=spec.holder_identity or None,
        duration_seconds=float(spec.lease_duration_seconds or 0),
        transitions=int(spec.lease_transitions or 0),
        resource_version=str(lease.metadata.resource_version),
        pod_name=annotations.get(replica_proof.POD_NAME_ANNOTATION) or None,
        pod_uid=annotations.get(replica_proof.POD_UID_ANNOTATION) or None,
        uid=str(lease.metadata.uid or ""),
    )


def read(*, namespace: str, name: str) -> sharding.LeaseRecord | None:
    try:
        lease = _api().read_namespaced_lease(
            name, namespace, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS
        )
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise _failure(error, doing=f"reading Lease {namespace}/{name}") from None
    return _record(lease)


def list_labelled(*, namespace: str, label: str, value: str) -> list[sharding.LeaseRecord]:
    leases = kube._call(_api().list_namespaced_lease, namespace, label_selector=f"{label}={value}")
    return [_record(lease) for lease in leases.items]


def watch_labelled(
    *,
    namespace: str,
    label: str,
    value: str,
    on_seen: Callable[[str, sharding.LeaseRecord, float], None],
    stopping: threading.Event,
) -> None:
    """Report every version of the labelled Leases as it arrives, until ``stopping``.

    ``on_seen(event_type, record, seen_at)`` with ``seen_at`` the monotonic time the event
    was read — what ``sharding.observe`` backdates a sighting to. A listing starts each
    watch (its Leases reported as ADDED), so nothing between two watches goes unseen
    (``watching``). Blocking (the official client's watch): run it in a thread of its own.
    Failures are only logged and retried: the periodic listing judges membership without
    this watch, with sightings up to one listing late.
    """
    watching.list_then_watch(
        list_method=_api().list_namespaced_lease,
        namespace=namespace,
        label_selector=f"{label}={value}",
        what=f"the member Leases in namespace {namespace} (sharding)",
        consequence="until it works, renewals are seen at the periodic listing, and a dead "
        "replica's policies move up to a third of the Lease duration later",
        rights="grant the operator watch on leases.coordination.k8s.io",
        on_event=lambda event_type, lease, seen_at: on_seen(event_type, _record(lease), seen_at),
        stopping=stopping,
    )


def write(
    *,
    namespace: str,
    name: str,
    acquire: sharding.Acquire,
    holder: str | None,
    duration_seconds: int,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> sharding.LeaseRecord:
    """Create the Lease, or replace it if it is still at ``acquire.resource_version``.

    ``holder=None`` releases it: a free Lease anyone may take at once."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    metadata: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    spec: dict[str, Any] = {
        "leaseDurationSeconds": duration_seconds,
        "leaseTransitions": acquire.transitions,
        "renewTime": now,
    }
    if holder is not None:
        spec["holderIdentity"] = holder
    if holder is not None and acquire.takeover:
        spec["acquireTime"] = now
    body: dict[str, Any] = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": spec,
    }
    try:
        if acquire.resource_version is None:
            lease = _api().create_namespaced_lease(
                namespace, body, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS
            )
        else:
            metadata["resourceVersion"] = acquire.resource_version
            lease = _api().replace_namespaced_lease(
                name, namespace, body, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS
            )
    except kubernetes.client.ApiException as error:
        if error.status in (404, 409):
            raise LeaseConflict(f"Lease {namespace}/{name} changed meanwhile") from None
        raise _failure(error, doing=f"writing Lease {namespace}/{name}") from None
    return _record(lease)


def list_replica_pods(*, namespace: str, selector: str) -> list[replica_proof.ReplicaPod]:
    """The Pods in ``namespace`` carrying the replica labels (one request)."""
    try:
        listed = kubernetes.client.CoreV1Api(kube._client()).list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS
        )
    except kubernetes.client.ApiException as error:
        raise kube.KubernetesUnavailable(
            f"listing the replica Pods in {namespace} failed: HTTP {error.status} "
            f"{error.reason} — the operator's ServiceAccount needs list on pods in its own "
            "namespace to check the member Leases"
        ) from None
    return [
        replica_proof.ReplicaPod(
            name=str(pod.metadata.name),
            uid=str(pod.metadata.uid),
            labels=dict(pod.metadata.labels or {}),
            terminating=pod.metadata.deletion_timestamp is not None,
            phase=pod.status.phase if pod.status else None,
        )
        for pod in listed.items
    ]


def post_event(*, namespace: str, record: sharding.LeaseRecord, reason: str, message: str) -> None:
    """A Warning Event on a Lease (``kubectl describe lease`` shows it). Best effort."""
    kube.post_event_on(
        kubernetes.client.V1ObjectReference(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            name=record.name,
            namespace=namespace,
            uid=record.uid or None,
        ),
        event_type="Warning",
        reason=reason,
        message=message,
        missing_right_hint="grant the operator create on events in its own namespace",
    )


def _failure(error: kubernetes.client.ApiException, *, doing: str) -> kube.KubernetesUnavailable:
    return kube.KubernetesUnavailable(
        f"{doing} failed: HTTP {error.status} {error.reason} — the operator's ServiceAccount "
        "needs get, list, watch, create, update on leases.coordination.k8s.io in its own "
        "namespace"
    )
