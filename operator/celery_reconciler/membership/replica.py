"""This replica in its group: it joins, serves the policies it owns, and leaves.

``Membership`` composes the parts (``member_lease``, ``member_view``, ``policy_leases``, on
the ``lease_threads``) and keeps the decisions that need them together: the renewals'
self-fencing, which policies this replica owns, and when a policy's loop runs or hands
over. ``configure`` and ``current`` give the kopf handlers the one per operator process.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from celery_reconciler import ledger, replica_proof, sharding
from celery_reconciler.membership import lease_threads, member_lease, member_view, policy_leases

# One logger for the package, named as the module it was: users filter the log by it.
logger = logging.getLogger(__package__)


class Handover:
    """The stop signal a ``PolicyLoop`` gets: kopf's (the policy is gone, the operator
    stops) or ours (the policy moves to another replica). Quacks like kopf's
    ``DaemonStopped``: truthy once stopping, ``await wait()`` until then."""

    def __init__(self, stopped: Any) -> None:
        self._stopped = stopped
        self.moving = asyncio.Event()

    def __bool__(self) -> bool:
        return bool(self._stopped) or self.moving.is_set()

    async def wait(self) -> None:
        waiters = {
            asyncio.ensure_future(self._stopped.wait()),
            asyncio.ensure_future(self.moving.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


RunLoop = Callable[[sharding.Fence, Handover], Awaitable[None]]


class Membership:
    def __init__(
        self,
        *,
        namespace: str,
        group: str,
        replica: str,
        lease_seconds: int,
        proof: replica_proof.Identity | None = None,
    ) -> None:
        self.namespace = namespace
        self.proof = proof
        self.group = group
        # A nonce per process: a restarted container is a new holder, so nothing it did
        # not take itself counts as its own, while assignment (by replica) stays put.
        self.identity = f"{replica}/{secrets.token_hex(4)}"
        self.lease_seconds = lease_seconds
        self.renew_seconds = max(1.0, lease_seconds / 3)
        self.threads = lease_threads.LeaseThreads()
        self.own_lease = member_lease.MemberLease(
            namespace=namespace,
            group=group,
            replica=replica,
            identity=self.identity,
            lease_seconds=lease_seconds,
            proof=proof,
        )
        self.view = member_view.MemberView(
            own_lease=self.own_lease, renew_seconds=self.renew_seconds, threads=self.threads
        )
        self.policy_leases = policy_leases.PolicyLeases(view=self.view, threads=self.threads)
        self.tasks: list[asyncio.Task[None]] = []
        # Every policy's uid (a kopf index, set by the daemons): the assignment shares them
        # all out, so each replica needs the whole list. Recomputed only when it or the
        # member list changes.
        self.every_policy: Callable[[], Iterable[str]] = tuple
        self.assigned_for: tuple[frozenset[str], tuple[str, ...]] | None = None
        self.assignment: dict[str, str] = {}

    # -- membership ---------------------------------------------------------------------

    def start(self) -> None:
        logger.info(
            "sharding: replica %s joins group %s (Leases in namespace %s, %ss)",
            self.identity,
            self.group,
            self.namespace,
            self.lease_seconds,
        )
        if self.proof is None:
            logger.info(
                "sharding: not in a Pod ($POD_UID unset): member Leases are not checked "
                "against the replicas' Pods"
            )
        else:
            logger.info(
                "sharding: member Leases count only if a running Pod labelled %s wrote them; "
                "this replica's Pod: %s (uid %s)",
                self.proof.selector_text() or "(any labels)",
                self.proof.pod_name,
                self.proof.pod_uid,
            )
        self.view.start_watch()
        self.tasks = [
            asyncio.ensure_future(self.renew_forever()),
            asyncio.ensure_future(self.view.look_forever()),
        ]

    async def renew_forever(self) -> None:
        while True:
            try:
                await self.threads.call_member(self.own_lease.renew)
            except Exception as error:  # the API server away: keep trying, self-fence below
                logger.warning("sharding: renewing membership failed: %s", error)
            if not self.own_lease.held(now=time.monotonic()):
                if self.view.listed:
                    self.view.note(())
            elif self.identity not in self.view.alive:
                self.view.look_now.set()  # (re)joined: count ourselves without waiting
            await asyncio.sleep(self.renew_seconds)

    def owns(self, policy_uid: str) -> bool:
        if not self.own_lease.held(now=time.monotonic()):
            return False
        uids = frozenset(self.every_policy())
        if (uids, self.view.alive) != self.assigned_for:
            self.assigned_for = (uids, self.view.alive)
            self.assignment = sharding.assign_to_holders(uids, self.view.alive)
        return self.assignment.get(policy_uid) == self.identity

    async def wait_for_change(self, stopped: Any, *, timeout_seconds: float) -> None:
        waiters = {
            asyncio.ensure_future(stopped.wait()),
            asyncio.ensure_future(self.view.changed.wait()),
        }
        try:
            await asyncio.wait(
                waiters, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def leave(self) -> None:
        """On shutdown: give the member Lease back, so the others rebalance at once."""
        self.view.stop_watch()
        for task in self.tasks:
            task.cancel()
        try:
            await self.threads.call_member(self.own_lease.release)
        except Exception as error:  # it expires on its own
            logger.warning("sharding: releasing the member Lease failed: %s", error)

    # -- policies -----------------------------------------------------------------------

    async def serve(
        self,
        *,
        uid: str,
        key: str,
        stopped: Any,
        run_loop: RunLoop,
        every_policy: Callable[[], Iterable[str]],
    ) -> None:
        """Run the policy's loop whenever this replica owns it, until kopf stops the daemon."""
        self.every_policy = every_policy
        at_least_token = 0
        while not stopped:
            if not self.view.listed or not self.owns(uid):
                await self.wait_for_change(stopped, timeout_seconds=self.renew_seconds)
                continue
            fence = await self.policy_leases.acquire(
                uid=uid, key=key, at_least_token=at_least_token
            )
            if fence is None:
                await self.wait_for_change(stopped, timeout_seconds=self.renew_seconds)
                continue
            logger.info("sharding: policy %s: swept here (token %d)", key, fence.token)
            handover = Handover(stopped)
            watcher = asyncio.ensure_future(self.watch_ownership(uid, handover))
            try:
                await run_loop(fence, handover)
            except ledger.FencedOut as error:
                logger.warning("sharding: policy %s: %s", key, error)
                if error.current is not None and error.current.token >= fence.token:
                    at_least_token = error.current.token + 1
            finally:
                watcher.cancel()
                await self.policy_leases.release(uid=uid, fence=fence)

    async def watch_ownership(self, uid: str, handover: Handover) -> None:
        while not handover:
            await self.wait_for_change(handover, timeout_seconds=self.renew_seconds)
            if not self.owns(uid):
                handover.moving.set()

    async def lease_backs(self, *, uid: str, fence: sharding.Fence) -> bool:
        """Whether the policy's Lease still names ``fence`` (``PolicyLeases.backs``)."""
        return await self.policy_leases.backs(uid=uid, fence=fence)


_membership: Membership | None = None


def configure(membership: Membership | None) -> None:
    global _membership
    _membership = membership


def current() -> Membership | None:
    return _membership
