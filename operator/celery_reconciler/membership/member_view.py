"""Who is alive in the group, as this replica sees it: the member Leases listed and watched.

The listing (one request) runs every ``renew_seconds`` and besides at the moment the first
live member would expire (``sharding.next_look_at``) or a watch event may change who is
alive (a join, a release). A thread watches the member Leases and dates each renewal when it
arrived rather than at the next listing. So a replica that dies leaves the member list no
later than one Lease duration after its death, plus a round trip — the takeover bound
``docs/operations.md`` states.

Which member Leases count: with ``proof`` (the replica runs in a Pod) only those a running
replica wrote, judged by ``replica_proof`` against the replicas' Pods listed at each
listing; a Lease that fails is left out of the member list and named once in a log line
and a Warning Event on it. Without (a replica outside Kubernetes) every member Lease
counts, as before: there is no Pod to prove anything against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from celery_reconciler import leases, replica_proof, sharding
from celery_reconciler.membership import lease_threads, member_lease

# One logger for the package, named as the module it was: users filter the log by it.
logger = logging.getLogger(__package__)


class MemberView:
    def __init__(
        self,
        *,
        own_lease: member_lease.MemberLease,
        renew_seconds: float,
        threads: lease_threads.LeaseThreads,
    ) -> None:
        self.own_lease = own_lease
        self.namespace = own_lease.namespace
        self.group = own_lease.group
        self.identity = own_lease.identity
        self.lease_seconds = own_lease.lease_seconds
        self.proof = own_lease.proof
        self.renew_seconds = renew_seconds
        self.threads = threads
        # Lease name -> (holder, why) of the member Leases left out: each reported once,
        # and again only if it changes; a renewal of one does not ask for a listing.
        self.ignored: dict[str, tuple[str | None, str]] = {}
        self.alive: tuple[str, ...] = ()
        self.listed = False
        self.first_listed_at: float | None = None  # monotonic
        self.changed = asyncio.Event()
        self.sightings: dict[str, sharding.Sighting] = {}
        # (Lease name, resourceVersion) -> when the watch first delivered it (monotonic):
        # what the next listing dates a renewal by. Kept until a listing can have used it.
        self.first_seen: dict[tuple[str, str], float] = {}
        self.look_now = asyncio.Event()  # a watch event that may change who is alive
        self.listed_alive: frozenset[str] = frozenset()  # per the last listing alone
        self.watch_stopping = threading.Event()

    def start_watch(self) -> None:
        """Watch the member Leases in a thread; each event lands in ``seen``, in this loop."""
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

    def stop_watch(self) -> None:
        self.watch_stopping.set()

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
        members = await self.threads.call_member(
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
        if self.own_lease.held(now=now):
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
        pods = await self.threads.call_member(
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
            if name == self.own_lease.name:
                message += " — this replica's own Lease: the other replicas leave it out"
            logger.warning("sharding: %s", message)
            await self.threads.call_member(
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

    def note(self, alive: tuple[str, ...]) -> None:
        if alive != self.alive:
            logger.info("sharding: live replicas now %s", ", ".join(alive) or "none")
            self.alive = alive
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()
