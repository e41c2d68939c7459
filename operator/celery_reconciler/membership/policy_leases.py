"""The policies' Leases: a replica sweeps a policy only while it holds the policy's Lease.

``acquire`` takes the Lease with a conditional write when ``sharding.acquisition`` allows it
(free, expired, or held by a replica that is no member any more); its ``transitions`` are the
fencing token the ledger's owner row checks. ``release`` hands it back so the next owner
need not wait a Lease duration. All of it runs on the policy Lease threads.
"""

from __future__ import annotations

import logging
import time

from celery_reconciler import kube, leases, sharding
from celery_reconciler.membership import lease_threads, member_view

# One logger for the package, named as the module it was: users filter the log by it.
logger = logging.getLogger(__package__)


class PolicyLeases:
    def __init__(
        self, *, view: member_view.MemberView, threads: lease_threads.LeaseThreads
    ) -> None:
        self.view = view
        self.namespace = view.namespace
        self.group = view.group
        self.identity = view.identity
        self.lease_seconds = view.lease_seconds
        self.threads = threads

    def name(self, policy_uid: str) -> str:
        return leases.object_name(self.group, "policy", policy_uid)

    async def acquire(self, *, uid: str, key: str, at_least_token: int) -> sharding.Fence | None:
        name = self.name(uid)
        try:
            record = await self.threads.call(leases.read, namespace=self.namespace, name=name)
            watched = time.monotonic() - (self.view.first_listed_at or time.monotonic())
            decision = sharding.acquisition(
                record,
                me=self.identity,
                alive=self.view.alive,
                at_least_token=at_least_token,
                absence_proves_death=watched >= self.lease_seconds,
            )
            if decision is None:
                return None
            written = await self.threads.call(
                leases.write,
                namespace=self.namespace,
                name=name,
                acquire=decision,
                holder=self.identity,
                duration_seconds=self.lease_seconds,
                labels={leases.POLICY_LABEL: self.group},
                annotations={leases.POLICY_ANNOTATION: key},
            )
        except (leases.LeaseConflict, kube.KubernetesUnavailable) as error:
            logger.info("sharding: policy %s: Lease not taken: %s", key, error)
            return None
        except Exception as error:  # network: the next tick tries again
            logger.warning("sharding: policy %s: Lease not taken: %s", key, error)
            return None
        return sharding.Fence(policy_key=key, holder=self.identity, token=written.transitions)

    async def backs(self, *, uid: str, fence: sharding.Fence) -> bool:
        """Whether the policy's Lease still names ``fence``: this holder, this token. False
        when it does not, or cannot be read (then a refusal is taken for a takeover)."""
        try:
            record = await self.threads.call(
                leases.read, namespace=self.namespace, name=self.name(uid)
            )
        except Exception as error:  # unknown: hand over, as before
            logger.warning("sharding: policy %s: Lease not read: %s", fence.policy_key, error)
            return False
        return (
            record is not None
            and record.holder == fence.holder
            and record.transitions == fence.token
        )

    async def release(self, *, uid: str, fence: sharding.Fence) -> None:
        """Free the policy's Lease if we still hold it, so its next owner need not wait."""
        name = self.name(uid)
        try:
            record = await self.threads.call(leases.read, namespace=self.namespace, name=name)
            if record is None or record.holder != self.identity:
                return
            await self.threads.call(
                leases.write,
                namespace=self.namespace,
                name=name,
                acquire=sharding.Acquire(record.resource_version, record.transitions, False),
                holder=None,
                duration_seconds=self.lease_seconds,
                labels={leases.POLICY_LABEL: self.group},
                annotations={leases.POLICY_ANNOTATION: fence.policy_key},
            )
            logger.info("sharding: policy %s: released", fence.policy_key)
        except Exception as error:  # it frees itself when we leave the member list
            logger.warning("sharding: policy %s: release failed: %s", fence.policy_key, error)
