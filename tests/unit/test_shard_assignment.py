"""Assignment of policies to replicas, Lease expiry and the fencing decision (pure)."""

from __future__ import annotations

import uuid
from collections import Counter

from celery_reconciler import sharding

POLICIES = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"policy-{n}")) for n in range(600)]
REPLICAS = ("celery-reconciler-7d9f-a", "celery-reconciler-7d9f-b", "celery-reconciler-7d9f-c")


def lease(
    name: str,
    holder: str | None,
    *,
    version: str = "1",
    transitions: int = 0,
    duration: float = 15,
) -> sharding.LeaseRecord:
    return sharding.LeaseRecord(
        name=name,
        holder=holder,
        duration_seconds=duration,
        transitions=transitions,
        resource_version=version,
    )


def test_policies_spread_evenly_over_every_replica() -> None:
    for count in (12, 100, 600):
        owners = Counter(sharding.assign(POLICIES[:count], REPLICAS).values())
        assert set(owners) == set(REPLICAS)
        assert max(owners.values()) - min(owners.values()) <= 2, owners
    # Fewer policies than replicas: one each, none twice.
    assert sorted(Counter(sharding.assign(POLICIES[:2], REPLICAS).values()).values()) == [1, 1]


def test_every_replica_computes_the_same_assignment_whatever_the_order() -> None:
    assert sharding.assign(POLICIES, REPLICAS) == sharding.assign(POLICIES[::-1], REPLICAS[::-1])


def test_a_replica_that_dies_hands_over_its_policies_and_few_others_move() -> None:
    before = sharding.assign(POLICIES, REPLICAS)
    after = sharding.assign(POLICIES, REPLICAS[:2])
    orphans = {uid for uid in POLICIES if before[uid] == REPLICAS[2]}
    moved = {uid for uid in POLICIES if before[uid] != after[uid]}
    assert orphans <= moved
    assert len(moved - orphans) <= 0.05 * len(POLICIES), len(moved - orphans)
    assert set(after.values()) == set(REPLICAS[:2])


def test_a_replica_that_joins_takes_its_share_and_few_others_move() -> None:
    before = sharding.assign(POLICIES, REPLICAS)
    joined = "celery-reconciler-7d9f-d"
    after = sharding.assign(POLICIES, (*REPLICAS, joined))
    moved = [uid for uid in POLICIES if before[uid] != after[uid]]
    taken = [uid for uid in moved if after[uid] == joined]
    assert len(taken) == len(POLICIES) // 4
    assert len(moved) - len(taken) <= 0.05 * len(POLICIES), len(moved) - len(taken)


def test_assignment_follows_the_replica_not_the_process() -> None:
    holders = [f"{replica}/1a2b" for replica in REPLICAS]
    restarted = [*holders[:2], f"{REPLICAS[2]}/ffff"]
    before = sharding.assign_to_holders(POLICIES, holders)
    after = sharding.assign_to_holders(POLICIES, restarted)
    assert {uid for uid in POLICIES if before[uid] == holders[2]} == {
        uid for uid in POLICIES if after[uid] == restarted[2]
    }
    assert sharding.assign(POLICIES, REPLICAS) == {
        uid: sharding.replica_of(holder) for uid, holder in before.items()
    }


def test_no_live_replica_assigns_nothing() -> None:
    assert sharding.assign(POLICIES, ()) == {}
    assert sharding.assign_to_holders(POLICIES, ()) == {}


def test_a_lease_expires_a_duration_after_this_replica_saw_it_change() -> None:
    seen = sharding.observe({}, [lease("a", "x", version="7")], now=100.0)
    assert not sharding.expired(lease("a", "x", version="7"), seen["a"], now=114.9)
    assert sharding.expired(lease("a", "x", version="7"), seen["a"], now=115.0)
    # Renewed (a new version): the clock starts again when this replica sees it.
    renewed = sharding.observe(seen, [lease("a", "x", version="8")], now=112.0)
    assert renewed["a"] == sharding.Sighting("8", 112.0)
    assert not sharding.expired(lease("a", "x", version="8"), renewed["a"], now=115.0)
    # Unchanged: the first sighting stands.
    assert sharding.observe(renewed, [lease("a", "x", version="8")], now=120.0) == renewed


def test_a_renewal_the_watch_delivered_first_is_dated_when_it_arrived() -> None:
    seen = sharding.observe({}, [lease("a", "x", version="7")], now=100.0)
    renewed = [lease("a", "x", version="8")]
    watched = {("a", "8"): 101.5, ("a", "9"): 103.0}
    assert sharding.observe(seen, renewed, now=103.2, first_seen=watched)["a"] == (
        sharding.Sighting("8", 101.5)
    )
    # Only that very version counts; never a time later than the listing itself.
    assert sharding.observe(seen, renewed, now=103.2, first_seen={("a", "9"): 101.0})["a"] == (
        sharding.Sighting("8", 103.2)
    )
    assert sharding.observe(seen, renewed, now=101.0, first_seen=watched)["a"] == (
        sharding.Sighting("8", 101.0)
    )
    # A listing behind the watch (it shows 7 after the watch brought 8) moves nothing back.
    assert sharding.observe(seen, [lease("a", "x", version="7")], now=102.0, first_seen=watched)[
        "a"
    ] == sharding.Sighting("7", 100.0)


def test_a_death_is_looked_at_when_it_is_due_not_at_the_next_round() -> None:
    records = [
        lease("a", "r1/1", version="1", duration=6),
        lease("b", "r2/1", version="5", duration=6),
    ]
    seen = {"a": sharding.Sighting("1", 100.0), "b": sharding.Sighting("5", 101.5)}
    assert sharding.next_look_at(records, seen, now=103.0, every_seconds=2) == 105.0
    assert sharding.next_look_at(records, seen, now=105.0, every_seconds=2) == 106.0
    # Expired ones (dead already), free ones and unsighted versions set no time: no busy loop.
    assert sharding.next_look_at(records, seen, now=106.0, every_seconds=2) == 107.5
    others = [lease("c", None), lease("d", "r3/1", version="2")]
    assert sharding.next_look_at(others, seen, now=200.0, every_seconds=2) == 202.0


def test_a_dead_member_leaves_no_later_than_one_duration_after_its_death() -> None:
    """The bound the operations guide states: renewals every third of the duration, dated
    by the watch (3 ms late here), a listing every renewal period and one when due; the
    kill comes at any time before the renewal that would have followed the last one."""
    duration, every = 6.0, 2.0
    for last_renewal, kill in ((0.0, 0.0), (0.0, 1.99), (0.7, 2.6)):
        record = lease("a", "victim/1", version="v", duration=duration)
        now = last_renewal + 1.5  # the first listing that shows the last renewal
        watched = {("a", "v"): last_renewal + 0.003}
        seen = sharding.observe({}, [record], now=now, first_seen=watched)
        while sharding.live_members([record], seen, now=now):
            now = sharding.next_look_at([record], seen, now=now, every_seconds=every)
        assert last_renewal + duration <= now <= kill + duration + 0.01


def test_only_joins_releases_and_deletions_of_members_ask_for_a_listing_at_once() -> None:
    alive = ("r1/1", "r2/1")
    assert not sharding.may_change_members(lease("a", "r1/1", version="9"), alive)
    assert sharding.may_change_members(lease("c", "r3/1"), alive)
    assert sharding.may_change_members(lease("a", None), alive)
    assert sharding.may_change_members(None, alive)


def test_a_lease_not_seen_yet_counts_as_just_renewed_and_a_free_one_as_expired() -> None:
    assert not sharding.expired(lease("a", "x"), None, now=1e9)
    assert sharding.expired(lease("a", None), None, now=0.0)


def test_live_members_are_the_holders_of_unexpired_member_leases() -> None:
    records = [lease("a", "r1/1", version="1"), lease("b", "r2/1", version="5"), lease("c", None)]
    seen = sharding.observe({}, records, now=0.0)
    assert sharding.live_members(records, seen, now=1.0) == ("r1/1", "r2/1")
    renewed = [records[0], lease("b", "r2/1", version="6"), records[2]]
    seen = sharding.observe(seen, renewed, now=10.0)
    assert sharding.live_members(renewed, seen, now=16.0) == ("r2/1",)


def test_acquisition_keeps_takes_or_waits() -> None:
    alive = {"me/1", "other/1"}
    create = sharding.acquisition(None, me="me/1", alive=alive)
    assert create == sharding.Acquire(resource_version=None, transitions=0, takeover=True)
    mine = lease("p", "me/1", version="9", transitions=4)
    assert sharding.acquisition(mine, me="me/1", alive=alive) == sharding.Acquire("9", 4, False)
    held = lease("p", "other/1", version="9", transitions=4)
    assert sharding.acquisition(held, me="me/1", alive=alive) is None
    dead_holder = lease("p", "gone/1", version="9", transitions=4)
    assert sharding.acquisition(dead_holder, me="me/1", alive=alive) == sharding.Acquire(
        "9", 5, True
    )
    released = lease("p", None, version="9", transitions=4)
    assert sharding.acquisition(released, me="me/1", alive=alive) == sharding.Acquire("9", 5, True)


def test_a_replica_that_just_started_takes_only_free_leases() -> None:
    unknown_holder = lease("p", "started-meanwhile/1", version="9", transitions=4)
    assert (
        sharding.acquisition(unknown_holder, me="me/1", alive={"me/1"}, absence_proves_death=False)
        is None
    )
    released = lease("p", None, version="9", transitions=4)
    assert sharding.acquisition(
        released, me="me/1", alive={"me/1"}, absence_proves_death=False
    ) == sharding.Acquire("9", 5, True)


def test_acquisition_lifts_the_token_above_what_the_ledger_knows() -> None:
    recreated = lease("p", "me/1", version="2", transitions=0)
    raised = sharding.acquisition(recreated, me="me/1", alive={"me/1"}, at_least_token=8)
    assert raised == sharding.Acquire("2", 8, True)
    created = sharding.acquisition(None, me="me/1", alive={"me/1"}, at_least_token=8)
    assert created is not None and created.transitions == 8


def test_the_ledger_accepts_only_the_current_owner_or_a_newer_token() -> None:
    current = sharding.Fence("ns/p", "a/1", 5)
    assert sharding.fence_accepts(None, sharding.Fence("ns/p", "a/1", 0))
    assert sharding.fence_accepts(current, sharding.Fence("ns/p", "a/1", 5))
    assert sharding.fence_accepts(current, sharding.Fence("ns/p", "b/1", 6))
    assert not sharding.fence_accepts(current, sharding.Fence("ns/p", "b/1", 4))
    # Two holders never share a token: one claiming the current token is a stale replica.
    assert not sharding.fence_accepts(current, sharding.Fence("ns/p", "b/1", 5))


def test_lease_holder_identities_name_their_replica() -> None:
    assert sharding.replica_of("celery-reconciler-7d9f-a/1a2b") == "celery-reconciler-7d9f-a"
    assert sharding.replica_of("plain") == "plain"
