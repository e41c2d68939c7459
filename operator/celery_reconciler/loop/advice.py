"""Advice a policy carries as conditions: what the user should change, found while sweeping.

Neither piece of advice can be given at ``kubectl apply`` time: whether the pending query
has an index to use is a fact of the user's database (``reconcile.advise_index``, one
EXPLAIN at the first sweep of each generation, then hourly), and whether the lease is
shorter than the workers' heartbeat timeout is a fact of the workers running the policy's
entries (each sets its own, and only the ledger knows). Each becomes a condition on the
policy and one Warning Event when it turns bad.
"""

from __future__ import annotations

import asyncio
import logging
import time

from celery_reconciler import conditions, reconcile
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import events as events_module

# Every per-policy line of the operator's log names the loop as its source (see problems).
logger = logging.getLogger("celery_reconciler.loop")

# The pending query's plan is read at the first sweep of each generation, then hourly: an
# index created (or dropped) by a person shows within the hour, and asking costs one EXPLAIN.
INDEX_ADVICE_RECHECK_SECONDS = 3600.0

Condition = tuple[str, str, str, str]


class PolicyAdvice:
    def __init__(self, *, policy_key: str, events: events_module.PolicyEvents) -> None:
        self.policy_key = policy_key
        self.events = events
        self.index_condition: Condition | None = None
        self.index_checked: tuple[int, float] | None = None  # (generation, time.monotonic())
        self.lease_condition: Condition | None = None
        # The heartbeat timeout of the workers last seen running this policy's entries.
        self.workers_heartbeat_timeout_seconds: float | None = None

    def conditions(self) -> tuple[Condition, ...]:
        """The advice as conditions, for the status (none before it was first checked)."""
        return tuple(
            condition
            for condition in (self.index_condition, self.lease_condition)
            if condition is not None
        )

    async def check_lease(
        self, policy: policy_module.Policy, counts: reconcile.StatusSnapshot
    ) -> None:
        """Tell the user, on the policy, when its lease is shorter than the heartbeat timeout
        of the workers running its entries — which only the ledger knows (each worker sets
        its own), so nothing at apply time can refuse it."""
        seen = counts.consumption.workers_heartbeat_timeout_seconds
        if seen is not None:
            self.workers_heartbeat_timeout_seconds = seen
        if self.workers_heartbeat_timeout_seconds is None:
            return
        condition = conditions.lease_fits_workers(
            lease_seconds=policy.lease.timeout_seconds,
            heartbeat_timeout_seconds=self.workers_heartbeat_timeout_seconds,
        )
        if condition[1] == "False" and condition != self.lease_condition:
            logger.warning("policy %s: %s", self.policy_key, condition[3])
            await self.events.post(
                "Warning", conditions.LEASE_BELOW_HEARTBEAT_TIMEOUT, condition[3]
            )
        self.lease_condition = condition

    async def check_index(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions, generation: int
    ) -> None:
        """Tell the user, on the policy, when the pending query has no index to use."""
        checked = self.index_checked
        if (
            checked is not None
            and checked[0] == generation
            and time.monotonic() - checked[1] < INDEX_ADVICE_RECHECK_SECONDS
        ):
            return
        self.index_checked = (generation, time.monotonic())
        advice = await asyncio.to_thread(reconcile.advise_index, policy, db=db)
        condition = conditions.indexed(
            create_index=None if advice is None else advice.create_index,
            table=str(policy.source.table),
            table_rows=0 if advice is None else advice.table_rows,
        )
        if advice is not None and condition != self.index_condition:
            logger.warning("policy %s: %s", self.policy_key, condition[3])
            await self.events.post("Warning", conditions.MISSING_INDEX, condition[3])
        self.index_condition = condition
