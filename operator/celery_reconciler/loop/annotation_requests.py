"""What people ask of a policy through its annotations, carried out by its loop.

``sweep-now`` and ``retry-dead`` (``policy_annotations``; set by the CLI or kubectl) are
requests: the loop carries each out at its next sweep, says so in an Event, and removes the
annotation, which is how the CLI's ``--wait`` knows it was done. An annotation is input
anyone with ``edit`` can write: a value that does not parse is removed with a Warning Event,
never a reason for the policy to stop; so is a corrupt record of kopf's (its diff-base).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from celery_reconciler import kube, policy_annotations, reconcile
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import events as events_module


class AnnotationRequests:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        events: events_module.PolicyEvents,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.body = body  # kopf's live view: always the latest annotations
        self.events = events

    def value(self, annotation: str) -> str | None:
        annotations = self.body.get("metadata", {}).get("annotations") or {}
        value = annotations.get(annotation)
        return None if value is None else str(value)

    async def clear(self, annotation: str) -> None:
        if self.value(annotation) is not None:
            await asyncio.to_thread(
                kube.annotate_policy,
                namespace=self.namespace,
                name=self.name,
                annotations={annotation: None},
            )

    async def sweep_now_done(self) -> None:
        """The sweep this iteration runs is the one ``sweep-now`` asked for."""
        await self.clear(policy_annotations.SWEEP_NOW)

    async def repair_diffbase(self) -> None:
        """kopf's record of the last spec it handled is an annotation that ``edit`` can
        overwrite; kopf reads a corrupt one as absent (``handlers.TolerantDiffBaseStorage``),
        and this removes it, saying so, so that kopf writes a good one again."""
        problem = policy_annotations.diffbase_problem(self.value(policy_annotations.DIFFBASE))
        if problem is not None:
            await self.events.post("Warning", "InvalidRequest", f"{problem}; removed it")
            await self.clear(policy_annotations.DIFFBASE)

    async def retry_dead_if_asked(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions
    ) -> None:
        value = self.value(policy_annotations.RETRY_DEAD)
        if value is None:
            return
        try:
            request = policy_annotations.parse_retry_dead(value)
        except policy_annotations.InvalidAnnotation as error:
            await self.events.post("Warning", "InvalidRequest", f"{error}; removed it")
            await self.clear(policy_annotations.RETRY_DEAD)
            return
        revived = await asyncio.to_thread(
            reconcile.retry_dead, policy, db=db, entry_ids=request.entry_ids
        )
        await self.events.post(
            "Normal", "RetryDead", f"{revived} dead entries scheduled to run again"
        )
        await self.clear(policy_annotations.RETRY_DEAD)
