"""The kopf handlers: thin wiring between Kubernetes events and the per-policy loop.

* a daemon per ProcessingPolicy runs ``loop.PolicyLoop`` (sweep at once on start or resume —
  the seed's startup check — then every sweepInterval, woken early when needed);
* an event handler wakes that loop when the spec changes or a person asks for a sweep now
  or a retry of dead entries (annotations, so ``kubectl annotate`` is the whole UI);
* startup settings: our own finalizer and annotation names, Events posted by us rather than
  kopf's per-handler chatter, and peering so that one replica of several is active.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from celery_reconciler import kube, loop

_peering_lifetime_seconds = 30


def configure_peering(*, lifetime_seconds: int) -> None:
    global _peering_lifetime_seconds
    _peering_lifetime_seconds = lifetime_seconds


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{kube.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=kube.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=kube.GROUP, key="last-handled-configuration"
    )
    # Our loop posts the Events a person needs; kopf's "Handler ... succeeded" would bury them.
    settings.posting.level = logging.WARNING
    settings.peering.lifetime = _peering_lifetime_seconds
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90


@kopf.daemon(kube.GROUP, kube.VERSION, kube.POLICIES, cancellation_timeout=15.0)
async def policy_loop(
    *,
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    assert namespace is not None  # ProcessingPolicy is namespaced
    await loop.PolicyLoop(namespace=namespace, name=name, uid=uid, body=body).run(stopped)


@kopf.on.event(kube.GROUP, kube.VERSION, kube.POLICIES)
def wake_on_change(*, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    annotations = body.metadata.annotations
    observed = (body.get("status") or {}).get("observedGeneration")
    asked = loop.SWEEP_NOW_ANNOTATION in annotations or loop.RETRY_DEAD_ANNOTATION in annotations
    if asked or observed != body.metadata.get("generation"):
        loop.wake(f"{namespace}/{name}")
