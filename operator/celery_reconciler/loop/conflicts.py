"""Whether this policy may sweep at all, or must yield: the three ways it can be refused.

* An older policy of the same namespace processes the same rows (``planning.conflicts``
  over the kopf index of every policy): this one dispatches nothing, so no entry runs
  twice. A change of any policy in the namespace wakes the loops that yield
  (``wake_conflicted``), since it may free them.
* The database itself records an older policy, of any namespace, Secret or DSN spelling,
  that processes the same rows (``overlaps``): the database arbitrates. A record whose
  policy is gone (its finalizer removed by hand) is removed, and this policy runs.
* With replicas sharing the policies, the ledger's owner row refuses this replica's fence
  while the policy's Lease still names it: a disagreement to show, not a takeover.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from celery_reconciler import (
    conditions,
    kube,
    ledger,
    overlaps,
    planning,
    policy_annotations,
    reconcile,
    sharding,
)
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import schedule

# Every per-policy line of the operator's log names the loop as its source (see problems).
logger = logging.getLogger("celery_reconciler.loop")

# Loops that yield to an older policy; any policy change in their namespace may free them.
_CONFLICTED: set[str] = set()
# ``planning.conflicts`` of each namespace, with the claims it was computed from. Every loop
# asks at every sweep, and sorting hundreds of policies each time was a large part of an
# idle sweep's CPU. kopf's index keeps a policy's claim object until its value changes, so
# unchanged claims are recognised by identity (the cache holds them: no id is reused).
_CONFLICTS: dict[str, tuple[list[planning.PolicyClaim], dict[str, planning.Conflict]]] = {}


def conflicts_in(
    namespace: str, claims: Iterable[planning.PolicyClaim]
) -> dict[str, planning.Conflict]:
    current = list(claims)
    known = _CONFLICTS.get(namespace)
    unchanged = (
        known is not None
        and len(known[0]) == len(current)
        and all(map(operator.is_, known[0], current))
    )
    if known is not None and unchanged:
        return known[1]
    found = planning.conflicts(current)
    _CONFLICTS[namespace] = (current, found)
    return found


def wake_conflicted(namespace: str) -> None:
    """A policy of ``namespace`` changed or went away: let the loops that yield re-check."""
    for key in [key for key in _CONFLICTED if key.partition("/")[0] == namespace]:
        schedule.wake(key)


def forget(policy_key: str) -> None:
    """The loop of ``policy_key`` ended: it yields to no one, and may free others."""
    _CONFLICTED.discard(policy_key)
    wake_conflicted(policy_key.partition("/")[0])


def with_older_peer(
    policy: policy_module.Policy, *, peers: Mapping[str, Iterable[planning.PolicyClaim]]
) -> conditions.Problem | None:
    """Conflict when an older policy already processes the same rows (see
    ``planning.conflicts``): this one then dispatches nothing, so no entry runs twice."""
    found = conflicts_in(policy.namespace, peers.get(policy.namespace, ())).get(policy.key)
    if found is None:
        _CONFLICTED.discard(policy.key)
        return None
    _CONFLICTED.add(policy.key)
    winner = found.winner.partition("/")[2]
    return conditions.Problem(
        conditions.CONFLICT,
        f"overlaps the older ProcessingPolicy {winner} ({found.what}, same "
        f"spec.source.databaseSecretRef): this policy dispatches nothing while {winner} "
        "processes these rows; delete one of them or change its table, pending predicate "
        "or task",
    )


async def in_database(
    policy: policy_module.Policy,
    *,
    db: reconcile.Sessions,
    uid: str,
    metadata: Mapping[str, Any],
) -> conditions.Problem | None:
    """Conflict when the database records an older policy, of any namespace, Secret or
    DSN spelling, that processes the same rows (``overlaps``). A record whose policy is
    gone (its finalizer removed by hand) is removed, and this policy runs."""
    created = str(metadata.get("creationTimestamp") or "")
    mine = overlaps.held_by(policy, uid=uid, created=created)
    for _ in range(2):
        found = await asyncio.to_thread(reconcile.arbitrate, policy, db=db, mine=mine)
        if found is None:
            return None
        conflict, winner = found
        namespace, _, name = winner.policy_key.partition("/")
        try:
            existing = await asyncio.to_thread(kube.get_policy, namespace=namespace, name=name)
        except kube.KubernetesUnavailable:
            break  # cannot tell (say, no right to read that namespace): yield, to be safe
        if (existing or {}).get("metadata", {}).get("uid") == winner.policy_uid:
            break
        logger.info(
            "policy %s: the ledger recorded %s (uid %s), which no longer exists; removed it",
            policy.key,
            winner.policy_key,
            winner.policy_uid,
        )
        await asyncio.to_thread(
            reconcile.forget_work,
            db,
            policy_key=winner.policy_key,
            policy_uid=winner.policy_uid,
        )
    return conditions.Problem(
        conditions.CONFLICT,
        f"overlaps the older ProcessingPolicy {conflict.winner} ({conflict.what}, in the "
        "same database): this policy dispatches nothing while it processes these rows; "
        "delete one of them or change its table, pending predicate or task",
    )


async def owner_disagreement(
    refused: ledger.FencedOut,
    *,
    policy_key: str,
    fence: sharding.Fence | None,
    lease_backs: Callable[[sharding.Fence], Awaitable[bool]] | None,
) -> conditions.Problem | None:
    """The ledger refused this replica's fence while the policy's Lease still names it:
    the owner row was written by no replica under this Lease (forged, or left by an
    earlier Lease of the policy, deleted since). A real takeover writes the Lease first,
    so it never looks like this. When a Lease can carry a token above the row's,
    ``membership.serve`` takes the Lease over above it (and an Event says so);
    otherwise sweeping stops — the row is the fence — with a condition that says what
    disagrees, never silently. None when the Lease does not back this replica (or
    cannot be read): a takeover."""
    if fence is None or lease_backs is None or refused.current is None:
        return None
    if not await lease_backs(fence):
        return None
    row = refused.current
    return conditions.Problem(
        conditions.OWNER_ROW_DISAGREES,
        f"the ledger's owner row of this policy names {policy_annotations.shown(row.holder)}"
        f" (token {row.token}), but the policy's Lease is held by this replica, "
        f"{fence.holder} (token {fence.token}): no replica wrote that row under "
        f"this Lease. This replica takes its Lease over above that token if a Lease can "
        f"carry it (at most {sharding.MAX_LEASE_TOKEN}); otherwise nothing is dispatched "
        f"until the policy's row of {ledger.SCHEMA}.policy_owners (policy_key "
        f"{policy_key!r}) is removed. Check who may write that table: only the operator's "
        "role may (celery-reconciler grants)",
    )
