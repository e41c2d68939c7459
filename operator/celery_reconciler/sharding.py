"""Which replica sweeps which policy: pure decisions over what Kubernetes Leases say.

Active-active replicas split the policies between them, and three questions decide who
sweeps what. None of them needs a consensus of our own: the API server holds the state, and
its resourceVersion-conditional writes make each change a compare-and-set.

* **Who is alive** (membership): every replica renews a Lease of its own, labelled as a
  member. A member whose Lease nobody has seen change for its ``leaseDurationSeconds`` is
  gone. Expiry is judged by when *this* replica saw a Lease's resourceVersion change
  (``observe``), never by the ``renewTime`` another host's clock wrote — client-go's leader
  election does the same — so clock skew between hosts does not matter, only the rate of
  each host's own clock. The price: a replica that starts sees every Lease as fresh and
  waits one duration before it calls any of them expired.

  How late a death is noticed is the sum of two lags, and both are kept to round trips. A
  renewal is seen when it happens: a watch on the member Leases notes when each version
  first arrived (``first_seen``), and the listing that judges backdates its sighting to
  that moment. And expiry is looked at when it is due (``next_look_at``), not at the next
  periodic listing. A member renews every third of its duration, so its last renewal came
  at most that long before it died and never after: it leaves the member list no later
  than one duration after its death, plus a listing's round trip. Every verdict still
  comes from a listing made when it is due: a watch that stalls or falls behind only makes
  sightings later (a renewal seen late looks fresher), never calls a live member dead.
* **Who should sweep a policy** (``assign``): rendezvous hashing (highest random weight)
  of the policy's uid over the live members, with bounded loads. Every replica computes
  the same answer from the same member and policy lists without talking to the others.
  Plain rendezvous hashing moves the least (a replica that dies hands over only its own
  policies), but with few policies it is lumpy: 12 policies leave one of 3 replicas idle
  about once in 40 clusters. So each replica takes at most ``ceil(policies / replicas)``,
  and a policy whose favourite is full goes to its next favourite: the spread is even,
  and a death or a join moves a few percent more than the minimum
  (``tests/unit/test_shard_assignment.py``).
* **Who may sweep it** (the policy's own Lease, ``acquisition``): the assignment is a
  wish, and two replicas may briefly disagree about the member list. A replica sweeps a
  policy only while it holds that policy's Lease, taken with a conditional write when it is
  free or its holder is no live member any more. Each change of holder raises
  ``leaseTransitions``, which is therefore a fencing token: strictly increasing per policy.
  The ledger keeps the token of the current owner and refuses the writes of any older one
  (``fence_accepts`` is that rule, which the ledger's SQL mirrors), so a replica that lost
  its Lease without knowing it — paused, partitioned — cannot claim a single entry more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Collection, Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """What this module needs of a coordination.k8s.io/v1 Lease."""

    name: str
    holder: str | None
    duration_seconds: float
    transitions: int
    resource_version: str
    # The Pod its writer says it runs in (member Leases only; ``replica_proof`` checks it).
    pod_name: str | None = None
    pod_uid: str | None = None
    uid: str = ""  # the Lease object's own uid, for Events about it


@dataclasses.dataclass(frozen=True)
class Sighting:
    """When this replica first saw a Lease at its current resourceVersion (monotonic)."""

    resource_version: str
    seen_at: float


@dataclasses.dataclass(frozen=True)
class Fence:
    """A sweeper's claim to a policy: who, and the fencing token of its Lease."""

    policy_key: str
    holder: str
    token: int


def observe(
    previous: Mapping[str, Sighting],
    records: Iterable[LeaseRecord],
    *,
    now: float,
    first_seen: Mapping[tuple[str, str], float] | None = None,
) -> dict[str, Sighting]:
    """The sightings after a listing: a Lease that changed is seen now — or when the watch
    first delivered that very version (``first_seen``: (name, resourceVersion) -> time),
    if earlier — one that did not keeps the time it was first seen at that version, one
    that is gone is forgotten."""
    sightings: dict[str, Sighting] = {}
    for record in records:
        before = previous.get(record.name)
        if before is not None and before.resource_version == record.resource_version:
            sightings[record.name] = before
        else:
            watched = (first_seen or {}).get((record.name, record.resource_version), now)
            sightings[record.name] = Sighting(record.resource_version, min(now, watched))
    return sightings


def next_look_at(
    records: Iterable[LeaseRecord],
    sightings: Mapping[str, Sighting],
    *,
    now: float,
    every_seconds: float,
) -> float:
    """When to list the member Leases next: the moment the first of those still live would
    expire if it is not renewed meanwhile, or ``every_seconds`` from now, whichever comes
    first. Leases already expired (or free, or not sighted at their version) set no time."""
    look_at = now + every_seconds
    for record in records:
        sighting = sightings.get(record.name)
        if record.holder is None or sighting is None:
            continue
        if sighting.resource_version != record.resource_version:
            continue
        if expired(record, sighting, now=now):
            continue
        look_at = min(look_at, sighting.seen_at + record.duration_seconds)
    return look_at


def may_change_members(record: LeaseRecord | None, alive: Collection[str]) -> bool:
    """Whether a watch event (``None``: a member Lease deleted) may change who is alive
    without waiting for any expiry: a holder not counted yet (a replica joins), a Lease
    released (a replica left) or deleted. A renewal of a counted member changes nothing."""
    return record is None or record.holder is None or record.holder not in alive


def expired(record: LeaseRecord, sighting: Sighting | None, *, now: float) -> bool:
    """Free (no holder), or unchanged for its whole duration since this replica saw it."""
    if record.holder is None:
        return True
    if sighting is None or sighting.resource_version != record.resource_version:
        return False  # not seen at this version yet: it was just renewed, as far as we know
    return now - sighting.seen_at >= record.duration_seconds


def live_members(
    records: Iterable[LeaseRecord], sightings: Mapping[str, Sighting], *, now: float
) -> tuple[str, ...]:
    """The holders of the member Leases that have not expired, sorted."""
    return tuple(
        sorted(
            {
                record.holder
                for record in records
                if record.holder is not None
                and not expired(record, sightings.get(record.name), now=now)
            }
        )
    )


def weight(member: str, policy_uid: str) -> int:
    digest = hashlib.sha256(f"{member}\0{policy_uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def preference(policy_uid: str, members: Iterable[str]) -> list[str]:
    """The members in the policy's order of preference: highest weight first."""
    return sorted(members, key=lambda member: (weight(member, policy_uid), member), reverse=True)


def assign(policy_uids: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Every policy's member: its favourite among those not yet holding their share
    (policies taken in uid order, so every replica gets the same answer). Empty when no
    member is alive."""
    alive = sorted(set(members))
    uids = sorted(set(policy_uids))
    if not alive:
        return {}
    share = math.ceil(len(uids) / len(alive))
    load = dict.fromkeys(alive, 0)
    assigned: dict[str, str] = {}
    for uid in uids:
        member = next(member for member in preference(uid, alive) if load[member] < share)
        assigned[uid] = member
        load[member] += 1
    return assigned


def replica_of(identity: str) -> str:
    """The replica part of a holder identity ``<replica>/<process nonce>``: assignment
    hashes the replica, so a restarted process gets back the policies it had."""
    return identity.partition("/")[0]


def assign_to_holders(policy_uids: Iterable[str], alive: Iterable[str]) -> dict[str, str]:
    """``assign`` over live holder identities, by their replica."""
    by_replica = {replica_of(identity): identity for identity in alive}
    return {uid: by_replica[replica] for uid, replica in assign(policy_uids, by_replica).items()}


@dataclasses.dataclass(frozen=True)
class Acquire:
    """Write the Lease with this holder and token (conditional on ``resource_version``;
    None: create it)."""

    resource_version: str | None
    transitions: int
    takeover: bool  # a new holder: the token rose


def acquisition(
    record: LeaseRecord | None,
    *,
    me: str,
    alive: Collection[str],
    at_least_token: int = 0,
    absence_proves_death: bool = True,
) -> Acquire | None:
    """How ``me`` gets or keeps a policy's Lease, or None while a live member holds it.

    A policy Lease is not renewed on its own: it is valid while its holder is a live member
    (its member Lease is renewed), so holding hundreds of policies costs no API writes until
    they move. It is free when released (no holder) or when its holder's member Lease
    expired. Keeping it keeps the token; taking it raises the token. ``at_least_token``
    lifts the token above one the ledger already knows — after someone deleted and
    re-created the Lease, whose count then restarted at zero.

    ``absence_proves_death=False`` while this replica has listed the members for less
    than a Lease duration: a holder missing from its first listings may just have
    started, so only a free Lease is taken.
    """
    if record is None:
        return Acquire(resource_version=None, transitions=max(0, at_least_token), takeover=True)
    if record.holder == me and record.transitions >= at_least_token:
        return Acquire(record.resource_version, record.transitions, takeover=False)
    dead = record.holder not in alive and absence_proves_death
    if record.holder == me or record.holder is None or dead:
        transitions = max(record.transitions + 1, at_least_token)
        return Acquire(record.resource_version, transitions, takeover=True)
    return None


# A policy's fencing token is its Lease's leaseTransitions, an int32 in the Kubernetes API:
# an owner row above it (forged) is a token no takeover can reach.
MAX_LEASE_TOKEN = 2**31 - 1


def fence_accepts(current: Fence | None, claimant: Fence) -> bool:
    """Whether the ledger lets ``claimant`` sweep: the first owner, a newer token (it took
    the Lease over), or the current owner itself. An older token is a replica that lost
    its Lease; two holders never share a token, since each takeover raised it."""
    if current is None or claimant.token > current.token:
        return True
    return claimant.token == current.token and claimant.holder == current.holder
