"""Events on one ProcessingPolicy, the story ``kubectl describe processingpolicy`` tells.

Every part of the loop that has something to tell a person (a problem, a rescue, advice, a
request carried out or refused) posts it here, so each posts the same way: in a thread (the
Kubernetes client blocks), on the policy object, best effort (``kube.post_event``).
"""

from __future__ import annotations

import asyncio

from celery_reconciler import kube


class PolicyEvents:
    def __init__(self, *, namespace: str, name: str, uid: str) -> None:
        self.namespace = namespace
        self.name = name
        self.uid = uid

    async def post(self, event_type: str, reason: str, message: str) -> None:
        await asyncio.to_thread(
            kube.post_event,
            namespace=self.namespace,
            policy_name=self.name,
            policy_uid=self.uid,
            event_type=event_type,
            reason=reason,
            message=message,
        )
