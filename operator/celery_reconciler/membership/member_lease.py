"""This replica's own member Lease: renewed while the replica runs, given back when it leaves.

While it is renewed within its duration the other replicas count this one alive; once it
is not, this replica counts itself out too (self-fencing) and stops its loops, since the
others may already have taken its policies. Both writes are blocking Kubernetes calls, run
on the member Lease thread (``lease_threads``).
"""

from __future__ import annotations

import time

from celery_reconciler import leases, replica_proof, sharding


class MemberLease:
    def __init__(
        self,
        *,
        namespace: str,
        group: str,
        replica: str,
        identity: str,
        lease_seconds: int,
        proof: replica_proof.Identity | None,
    ) -> None:
        self.namespace = namespace
        self.group = group
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.proof = proof
        self.name = leases.object_name(group, "member", replica)
        self.record: sharding.LeaseRecord | None = None
        self.renewed_at: float | None = None  # monotonic, last renewal of our member Lease

    def renew(self) -> None:
        record = self.record or leases.read(namespace=self.namespace, name=self.name)
        acquire = sharding.Acquire(
            resource_version=None if record is None else record.resource_version,
            transitions=0 if record is None else record.transitions,
            takeover=record is None or record.holder != self.identity,
        )
        try:
            self.record = leases.write(
                namespace=self.namespace,
                name=self.name,
                acquire=acquire,
                holder=self.identity,
                duration_seconds=self.lease_seconds,
                labels={leases.MEMBER_LABEL: self.group},
                annotations=None if self.proof is None else self.proof.annotations(),
            )
        except leases.LeaseConflict:
            self.record = None  # read afresh next time
            raise
        self.renewed_at = time.monotonic()

    def held(self, *, now: float) -> bool:
        """Whether the others still count us: our Lease renewed within its duration."""
        return self.renewed_at is not None and now - self.renewed_at < self.lease_seconds

    def release(self) -> None:
        """Free our member Lease; read it again once if a renewal that was already in
        flight when the renewals stopped wrote it meanwhile."""
        for attempt in range(2):
            record = self.record
            if record is None or attempt > 0:
                record = leases.read(namespace=self.namespace, name=self.name)
            if record is None or record.holder != self.identity:
                return
            try:
                leases.write(
                    namespace=self.namespace,
                    name=self.name,
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
