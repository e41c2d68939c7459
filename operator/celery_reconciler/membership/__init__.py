"""Active-active replicas at run time: this replica's member Lease, and the policies it sweeps.

One ``Membership`` runs per operator process, in parts that each keep one concern:

* ``member_lease``   this replica's own member Lease, renewed every ``renew_seconds`` (a
                     third of the Lease duration); self-fencing when it is not
* ``member_view``    who is alive: the member Leases listed and watched, proven against the
                     replicas' Pods; ``sharding`` says who should sweep which policy
* ``policy_leases``  a policy's Lease taken, checked and handed back
* ``lease_threads``  the threads that Lease I/O runs on, apart from the sweeps
* ``replica``        ``Membership``: joining, the policies owned, serving them, leaving

Each policy's kopf daemon calls ``serve``, which sweeps (runs the ``PolicyLoop``) only while
this replica is the policy's assigned owner *and* holds the policy's Lease, and hands the
Lease back when either stops being true:

* a replica joins: the policies it now wins are released by their old owners at their
  next tick (after the sweep in progress) and taken by it;
* a replica dies: its member Lease is seen unchanged for its duration, it leaves the
  member list, its policies are assigned to the others, whose ``serve`` takes each Lease
  (free, since its holder is no member any more) with a conditional write;
* this replica stops: its loops stop, it releases its policy Leases and its member Lease,
  and the others, whose watch sees the release, take over at once instead of after a
  Lease duration.

Why the DB fence as well: a replica that cannot reach the API server for longer than the
Lease duration is dropped by the others while it may still be mid-sweep. It stops its own
loops once it has not renewed its member Lease for the duration (self-fencing), but a
pause can outlast any timer; the ledger's owner row refuses its claims regardless
(``ledger.begin_sweep``, ``ledger.check_fence``).
"""

from celery_reconciler.membership.replica import (
    Handover,
    Membership,
    RunLoop,
    configure,
    current,
)

__all__ = ["Handover", "Membership", "RunLoop", "configure", "current"]
