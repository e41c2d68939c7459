"""Active-active replicas at run time: this replica's member Lease, and the policies it sweeps.

``Membership`` runs per operator process: a task that renews this replica's member Lease
every ``renew_seconds`` (a third of the Lease duration); a task that lists the member
Leases of its group (one request), from which ``sharding`` says who is alive and who
should sweep which policy; and a thread that watches those Leases. The listing runs every
``renew_seconds`` and besides at the moment the first live member would expire
(``sharding.next_look_at``) or a watch event may change who is alive (a join, a release).
The watch dates each renewal when it arrived rather than at the next listing. So a replica
that dies leaves the member list no later than one Lease duration after its death, plus
a round trip — the takeover bound ``docs/operations.md`` states. Each policy's kopf daemon
calls ``serve``, which sweeps (runs the ``PolicyLoop``) only while this replica is the
policy's assigned owner *and* holds the policy's Lease, and hands the Lease back when
either stops being true:

* a replica joins: the policies it now wins are released by their old owners at their
  next tick (after the sweep in progress) and taken by it;
* a replica dies: its member Lease is seen unchanged for its duration, it leaves the
  member list, its policies are assigned to the others, whose ``serve`` takes each Lease
  (free, since its holder is no member any more) with a conditional write;
* this replica stops: its loops stop, it releases its policy Leases and its member Lease,
  and the others, whose watch sees the release, take over at once instead of after a
  Lease duration.

Lease I/O runs on threads of its own, in two sets: renewals and listings on one, policy
Lease reads and writes on the other. The event loop's default executor runs every sweep,
and a few long sweeps there would hold up the renewals until the others count this
replica dead; likewise a takeover of many policies at once must not queue this replica's
renewal, nor a renewal queue the takeover.

Which member Leases count: with ``proof`` (the replica runs in a Pod) only those a running
replica wrote, judged by ``replica_proof`` against the replicas' Pods listed at each
listing; a Lease that fails is left out of the member list and named once in a log line
and a Warning Event on it. Without (a replica outside Kubernetes) every member Lease
counts, as before: there is no Pod to prove anything against.

Why the DB fence as well: a replica that cannot reach the API server for longer than the
Lease duration is dropped by the others while it may still be mid-sweep. It stops its own
loops once it has not renewed its member Lease for the duration (self-fencing), but a
pause can outlast any timer; the ledger's owner row refuses its claims regardless
(``ledger.begin_sweep``, ``ledger.check_fence``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from celery_reconciler import kube, leases, ledger, replica_proof, sharding

logger = logging.getLogger(__name__)


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
T = TypeVar("T")

# Policy Lease reads and writes at once: a takeover moves a third of the policies (with 3
# replicas), two round trips each.
POLICY_LEASE_THREADS = 8


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
        # Lease name -> (holder, why) of the member Leases left out: each reported once,
        # and again only if it changes; a renewal of one does not ask for a listing.
        self.ignored: dict[str, tuple[str | None, str]] = {}
        self.group = group
        # A nonce per process: a restarted container is a new holder, so nothing it did
        # not take itself counts as its own, while assignment (by replica) stays put.
        self.identity = f"{replica}/{secrets.token_hex(4)}"
        self.lease_seconds = lease_seconds
        self.renew_seconds = max(1.0, lease_seconds / 3)
        self.member_lease = leases.object_name(group, "member", replica)
        self.alive: tuple[str, ...] = ()
        self.listed = False
        self.first_listed_at: float | None = None  # monotonic
        self.renewed_at: float | None = None  # monotonic, last renewal of our member Lease
        self.changed = asyncio.Event()
        self.sightings: dict[str, sharding.Sighting] = {}
        # (Lease name, resourceVersion) -> when the watch first delivered it (monotonic):
        # what the next listing dates a renewal by. Kept until a listing can have used it.
        self.first_seen: dict[tuple[str, str], float] = {}
        self.look_now = asyncio.Event()  # a watch event that may change who is alive
        self.listed_alive: frozenset[str] = frozenset()  # per the last listing alone
        self.tasks: list[asyncio.Task[None]] = []
        self.watch_stopping = threading.Event()
        self.member_record: sharding.LeaseRecord | None = None
        # Every policy's uid (a kopf index, set by the daemons): the assignment shares them
        # all out, so each replica needs the whole list. Recomputed only when it or the
        # member list changes.
        self.every_policy: Callable[[], Iterable[str]] = tuple
        self.assigned_for: tuple[frozenset[str], tuple[str, ...]] | None = None
        self.assignment: dict[str, str] = {}
        # Threads of our own (see the module docstring): one each for renewing and listing,
        # and enough for policy Leases that a takeover's reads and writes do not queue.
        self.member_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="member-lease"
        )
        self.policy_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=POLICY_LEASE_THREADS, thread_name_prefix="policy-lease"
        )

    async def call(self, function: Callable[..., T], **kwargs: Any) -> T:
        """A policy Lease read or write, in a thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.policy_executor, functools.partial(function, **kwargs)
        )

    async def call_member(self, function: Callable[..., T], **kwargs: Any) -> T:
        """A renewal or listing of member Leases, in a thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.member_executor, functools.partial(function, **kwargs)
        )

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
        loop = asyncio.get_running_loop()

        def seen_in_thread(event_type: str, record: sharding.LeaseRecord, seen_at: float) -> None:
            loop.call_soon_threadsafe(self.seen, event_type, record, seen_at)

        threading.Thread(
            target=leases.watch_labelled,
            kwargs={
                "namespace": self.namespace,
                "label": leases.MEMBER_LABEL,
                "value": self.group,
                "on_seen": seen_in_thread,
                "stopping": self.watch_stopping,
            },
            name=f"member-leases:{self.namespace}",
            daemon=True,
        ).start()
        self.tasks = [
            asyncio.ensure_future(self.renew_forever()),
            asyncio.ensure_future(self.look_forever()),
        ]

    async def renew_forever(self) -> None:
        while True:
            try:
                await self.call_member(self.renew_member)
            except Exception as error:  # the API server away: keep trying, self-fence below
                logger.warning("sharding: renewing membership failed: %s", error)
            if not self.member(now=time.monotonic()):
                if self.listed:
                    self.note(())
            elif self.identity not in self.alive:
                self.look_now.set()  # (re)joined: count ourselves without waiting
            await asyncio.sleep(self.renew_seconds)

    async def look_forever(self) -> None:
        """List the members whenever ``sharding.next_look_at`` or the watch says so."""
        while True:
            look_at = time.monotonic() + self.renew_seconds
            self.look_now.clear()  # an event during the listing asks for the next one
            try:
                look_at = await self.look()
            except Exception as error:  # the API server away: the renewals self-fence
                logger.warning("sharding: listing the members failed: %s", error)
            wait_seconds = max(0.0, look_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.look_now.wait(), timeout=wait_seconds)

    async def look(self) -> float:
        """List the member Leases and judge who is alive; when to look again."""
        members = await self.call_member(
            leases.list_labelled,
            namespace=self.namespace,
            label=leases.MEMBER_LABEL,
            value=self.group,
        )
        if self.proof is not None:
            members = await self.proven(members, self.proof)
        now = time.monotonic()
        self.sightings = sharding.observe(
            self.sightings, members, now=now, first_seen=self.first_seen
        )
        # What this listing could have used is in the sightings now; a version the watch
        # delivered ahead of the listing is kept for the next one.
        self.first_seen = {
            key: seen_at
            for key, seen_at in self.first_seen.items()
            if now - seen_at < self.lease_seconds
        }
        self.listed_alive = frozenset(sharding.live_members(members, self.sightings, now=now))
        self.listed = True
        if self.first_listed_at is None:
            self.first_listed_at = now
        if self.member(now=now):
            self.note(tuple(sorted(self.listed_alive | {self.identity})))
        else:
            self.note(())  # self-fenced, as the renewals say: the others drop us too
        return sharding.next_look_at(
            members, self.sightings, now=now, every_seconds=self.renew_seconds
        )

    async def proven(
        self, members: list[sharding.LeaseRecord], proof: replica_proof.Identity
    ) -> list[sharding.LeaseRecord]:
        """The member Leases a running replica wrote; the others reported once each."""
        pods = await self.call_member(
            leases.list_replica_pods, namespace=self.namespace, selector=proof.selector_text()
        )
        verdict = replica_proof.judge(
            members,
            pods,
            selector=proof.selector,
            member_lease_name=lambda pod_name: leases.object_name(self.group, "member", pod_name),
        )
        by_name = {record.name: record for record in members}
        for name, why in verdict.ignored.items():
            record = by_name[name]
            if self.ignored.get(name) == (record.holder, why):
                continue
            message = f"member Lease {self.namespace}/{name} does not count as a replica: {why}"
            if name == self.member_lease:
                message += " — this replica's own Lease: the other replicas leave it out"
            logger.warning("sharding: %s", message)
            await self.call_member(
                leases.post_event,
                namespace=self.namespace,
                record=record,
                reason="MemberLeaseIgnored",
                message=message,
            )
        self.ignored = {name: (by_name[name].holder, why) for name, why in verdict.ignored.items()}
        return list(verdict.counted)

    def seen(self, event_type: str, record: sharding.LeaseRecord, seen_at: float) -> None:
        """A watch event (in the event loop): note when this version arrived, and look at
        once if it may change who is alive."""
        self.first_seen.setdefault((record.name, record.resource_version), seen_at)
        ignored = self.ignored.get(record.name)
        if event_type != "DELETED" and ignored is not None and ignored[0] == record.holder:
            return  # a renewal of a Lease left out: the periodic listing judges it again
        changed = None if event_type == "DELETED" else record
        if sharding.may_change_members(changed, self.listed_alive | {self.identity}):
            self.look_now.set()

    def renew_member(self) -> None:
        record = self.member_record or leases.read(namespace=self.namespace, name=self.member_lease)
        acquire = sharding.Acquire(
            resource_version=None if record is None else record.resource_version,
            transitions=0 if record is None else record.transitions,
            takeover=record is None or record.holder != self.identity,
        )
        try:
            self.member_record = leases.write(
                namespace=self.namespace,
                name=self.member_lease,
                acquire=acquire,
                holder=self.identity,
                duration_seconds=self.lease_seconds,
                labels={leases.MEMBER_LABEL: self.group},
                annotations=None if self.proof is None else self.proof.annotations(),
            )
        except leases.LeaseConflict:
            self.member_record = None  # read afresh next time
            raise
        self.renewed_at = time.monotonic()

    def member(self, *, now: float) -> bool:
        """Whether the others still count us: our Lease renewed within its duration."""
        return self.renewed_at is not None and now - self.renewed_at < self.lease_seconds

    def note(self, alive: tuple[str, ...]) -> None:
        if alive != self.alive:
            logger.info("sharding: live replicas now %s", ", ".join(alive) or "none")
            self.alive = alive
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()

    def owns(self, policy_uid: str) -> bool:
        if not self.member(now=time.monotonic()):
            return False
        uids = frozenset(self.every_policy())
        if (uids, self.alive) != self.assigned_for:
            self.assigned_for = (uids, self.alive)
            self.assignment = sharding.assign_to_holders(uids, self.alive)
        return self.assignment.get(policy_uid) == self.identity

    async def wait_for_change(self, stopped: Any, *, timeout_seconds: float) -> None:
        waiters = {
            asyncio.ensure_future(stopped.wait()),
            asyncio.ensure_future(self.changed.wait()),
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
        self.watch_stopping.set()
        for task in self.tasks:
            task.cancel()
        try:
            await self.call_member(self.release_member)
        except Exception as error:  # it expires on its own
            logger.warning("sharding: releasing the member Lease failed: %s", error)

    def release_member(self) -> None:
        """Free our member Lease; read it again once if a renewal that was already in
        flight when the renewals stopped wrote it meanwhile."""
        for attempt in range(2):
            record = self.member_record
            if record is None or attempt > 0:
                record = leases.read(namespace=self.namespace, name=self.member_lease)
            if record is None or record.holder != self.identity:
                return
            try:
                leases.write(
                    namespace=self.namespace,
                    name=self.member_lease,
                    acquire=sharding.Acquire(record.resource_version, record.transitions, False),
                    holder=None,
                    duration_seconds=self.lease_seconds,
                    labels={leases.MEMBER_LABEL: self.group},
                    annotations=None if self.proof is None else self.proof.annotations(),
                )
                return
            except leases.LeaseConflict:
                if attempt > 0:
                    raise

    # -- policies -----------------------------------------------------------------------

    def policy_lease(self, policy_uid: str) -> str:
        return leases.object_name(self.group, "policy", policy_uid)

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
            if not self.listed or not self.owns(uid):
                await self.wait_for_change(stopped, timeout_seconds=self.renew_seconds)
                continue
            fence = await self.acquire(uid=uid, key=key, at_least_token=at_least_token)
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
                await self.release(uid=uid, fence=fence)

    async def watch_ownership(self, uid: str, handover: Handover) -> None:
        while not handover:
            await self.wait_for_change(handover, timeout_seconds=self.renew_seconds)
            if not self.owns(uid):
                handover.moving.set()

    async def acquire(self, *, uid: str, key: str, at_least_token: int) -> sharding.Fence | None:
        name = self.policy_lease(uid)
        try:
            record = await self.call(leases.read, namespace=self.namespace, name=name)
            watched = time.monotonic() - (self.first_listed_at or time.monotonic())
            decision = sharding.acquisition(
                record,
                me=self.identity,
                alive=self.alive,
                at_least_token=at_least_token,
                absence_proves_death=watched >= self.lease_seconds,
            )
            if decision is None:
                return None
            written = await self.call(
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

    async def lease_backs(self, *, uid: str, fence: sharding.Fence) -> bool:
        """Whether the policy's Lease still names ``fence``: this holder, this token. False
        when it does not, or cannot be read (then a refusal is taken for a takeover)."""
        try:
            record = await self.call(
                leases.read, namespace=self.namespace, name=self.policy_lease(uid)
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
        name = self.policy_lease(uid)
        try:
            record = await self.call(leases.read, namespace=self.namespace, name=name)
            if record is None or record.holder != self.identity:
                return
            await self.call(
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


_membership: Membership | None = None


def configure(membership: Membership | None) -> None:
    global _membership
    _membership = membership


def current() -> Membership | None:
    return _membership
