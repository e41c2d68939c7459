"""The kopf handlers: thin wiring between Kubernetes events and the per-policy loop.

* a daemon per ProcessingPolicy runs ``loop.PolicyLoop`` (sweep at once on start or resume —
  the seed's startup check — then every sweepInterval, woken early when needed);
* an event handler wakes that loop when the spec changes or a person asks for a sweep now
  or a retry of dead entries (annotations, so ``kubectl annotate`` is the whole UI);
* an index of every policy by namespace, from which a loop learns whether an older policy
  already processes the same rows (then it reports ``Conflict`` and dispatches nothing);
* startup settings: our own finalizer and annotation names, Events posted by us rather than
  kopf's per-handler chatter, and either kopf peering (one replica of several is active) or
  Lease membership (``membership``: every replica is active, each sweeps its share of the
  policies — the daemon of a policy another replica owns waits in ``Membership.serve``).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from celery_reconciler import (
    kube,
    loop,
    membership,
    metrics,
    planning,
    policy,
    policy_annotations,
    sharding,
    statuswriter,
)

_peering_lifetime_seconds = 30


class TolerantDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff-base in an annotation, read as untrusted input: anyone with ``edit`` can
    overwrite it, and kopf's own reader then fails at every event of the policy (no status,
    a deletion stuck on the finalizer). A value that is not a JSON object reads as absent;
    the policy's loop removes it with a Warning Event (``loop.annotation_requests``)."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        for full_key in self.make_keys(self.key, body=body):
            if policy_annotations.diffbase_problem(body.metadata.annotations.get(full_key)):
                return None
        return super().fetch(body=body)


class TolerantProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's per-handler progress in annotations, read the same way: a value someone
    overwrote with something that is not JSON reads as no progress recorded."""

    def fetch(self, *, key: kopf.HandlerId, body: kopf.Body) -> kopf.ProgressRecord | None:
        try:
            return super().fetch(key=key, body=body)
        except ValueError:
            return None


def configure_peering(*, lifetime_seconds: int) -> None:
    global _peering_lifetime_seconds
    _peering_lifetime_seconds = lifetime_seconds


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{kube.GROUP}/finalizer"
    settings.persistence.progress_storage = TolerantProgressStorage(prefix=kube.GROUP)
    settings.persistence.diffbase_storage = TolerantDiffBaseStorage(
        prefix=kube.GROUP, key=policy_annotations.DIFFBASE_KEY
    )
    # Our loop posts the Events a person needs; kopf's "Handler ... succeeded" would bury them.
    settings.posting.level = logging.WARNING
    settings.peering.lifetime = _peering_lifetime_seconds
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90


@kopf.on.startup()
async def join_membership(**_: Any) -> None:
    shard = membership.current()
    if shard is not None:
        shard.start()  # a task of kopf's event loop, for the life of the operator


@kopf.index(kube.GROUP, kube.VERSION, kube.POLICIES)
def policies_by_namespace(
    *, name: str, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[str, planning.PolicyClaim] | None:
    """Policies that hold their rows: parsed, and not being deleted (an invalid spec
    dispatches nothing, so it cannot conflict)."""
    if namespace is None or body.metadata.get("deletionTimestamp"):
        return None
    try:
        parsed = policy.parse_policy(body.get("spec") or {}, namespace=namespace, name=name)
    except policy.InvalidPolicy:
        return None
    created = str(body.metadata.get("creationTimestamp") or "")
    return {namespace: planning.PolicyClaim(created=created, policy=parsed)}


@kopf.index(kube.GROUP, kube.VERSION, kube.POLICIES)
def policy_uids(*, uid: str, **_: Any) -> dict[str, str]:
    """Every policy's uid under one key: replicas that share the policies assign them all."""
    return {"all": uid}


@kopf.daemon(kube.GROUP, kube.VERSION, kube.POLICIES, cancellation_timeout=15.0)
async def policy_loop(
    *,
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    **kwargs: Any,
) -> None:
    assert namespace is not None  # ProcessingPolicy is namespaced
    # kopf passes each index as a keyword named after its function: a live view.
    peers: kopf.Index[str, planning.PolicyClaim] = kwargs["policies_by_namespace"]
    shard = membership.current()
    if shard is None:
        await loop.PolicyLoop(namespace=namespace, name=name, uid=uid, body=body, peers=peers).run(
            stopped
        )
        return

    async def run_loop(fence: sharding.Fence, handover: membership.Handover) -> None:
        try:
            await loop.PolicyLoop(
                namespace=namespace,
                name=name,
                uid=uid,
                body=body,
                peers=peers,
                fence=fence,
                lease_backs=lambda fence: shard.lease_backs(uid=uid, fence=fence),
            ).run(handover)
        finally:
            metrics.forget_gauges(namespace, name)

    uids: kopf.Index[str, str] = kwargs["policy_uids"]
    await shard.serve(
        uid=uid,
        key=f"{namespace}/{name}",
        stopped=stopped,
        run_loop=run_loop,
        every_policy=lambda: uids.get("all", ()),
    )


@kopf.on.cleanup()
async def leave_membership(**_: Any) -> None:
    shard = membership.current()
    if shard is not None:
        await shard.leave()


@kopf.on.cleanup()
async def stop_status_writer(**_: Any) -> None:
    await statuswriter.WRITER.close()


@kopf.on.event(kube.GROUP, kube.VERSION, kube.POLICIES)
def wake_on_change(
    *, type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    annotations = body.metadata.annotations
    observed = (body.get("status") or {}).get("observedGeneration")
    asked = any(
        request in annotations
        for request in (policy_annotations.SWEEP_NOW, policy_annotations.RETRY_DEAD)
    )
    changed = observed != body.metadata.get("generation")
    if asked or changed:
        loop.wake(f"{namespace}/{name}")
    if namespace and (changed or type == "DELETED" or body.metadata.get("deletionTimestamp")):
        loop.wake_conflicted(namespace)
