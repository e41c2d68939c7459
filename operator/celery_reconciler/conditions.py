"""Status conditions in the standard ``metav1.Condition`` shape, computed without I/O.

Users (and ``kubectl wait --for=condition=Ready``) read two conditions on every policy:
``Ready`` — the last sweep reached the database and the broker — and ``Degraded`` — with a
reason a person can act on. Transition times only move when a condition's status changes,
so a healthy policy's status does not churn on every sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

READY = "Ready"
DEGRADED = "Degraded"
# Whether the pending query reads the source through an index that holds the predicate.
INDEXED = "Indexed"
MISSING_INDEX = "MissingIndex"
INDEX_USED = "IndexUsed"
# Whether the lease is at least the heartbeat timeout of the workers running the policy's
# entries: below it, the ledger holds each attempt for the heartbeat timeout anyway, and a
# message not started within the lease is dispatched again.
LEASE_FITS_WORKERS = "LeaseFitsWorkers"
LEASE_BELOW_HEARTBEAT_TIMEOUT = "LeaseBelowHeartbeatTimeout"
LEASE_ABOVE_HEARTBEAT_TIMEOUT = "LeaseAboveHeartbeatTimeout"

# Reasons are CamelCase API constants: users match on them in alerts and scripts.
SWEPT = "Swept"
SUSPENDED = "Suspended"
INVALID_SPEC = "InvalidSpec"
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_INVALID = "SecretInvalid"
DATABASE_UNAVAILABLE = "DatabaseUnavailable"
# PostgreSQL has no connection slot left (SQLSTATE 53300): capacity, not a wrong DSN.
TOO_MANY_CONNECTIONS = "TooManyConnections"
# The operator's own bound on connections per database kept a policy waiting too long.
CONNECTION_POOL_EXHAUSTED = "ConnectionPoolExhausted"
BROKER_UNAVAILABLE = "BrokerUnavailable"
SOURCE_INVALID = "SourceInvalid"
LEDGER_PERMISSION_DENIED = "LedgerPermissionDenied"
KUBERNETES_UNAVAILABLE = "KubernetesUnavailable"
CONFLICT = "Conflict"
WORKERS_NOT_CONSUMING = "WorkersNotConsuming"
POD_WATCH_FAILED = "PodWatchFailed"
# The ledger's owner row names another replica than the policy's Lease does (membership).
OWNER_ROW_DISAGREES = "OwnerRowDisagrees"
# Running entries held by a silent worker process in a Pod that nothing proves gone yet.
HELD_BY_SILENT_WORKER = "HeldBySilentWorker"
# The last resort: a failure no other reason describes is a bug of ours. The loop reports it
# like any other (condition, Event, metric, backed-off retry) and logs its traceback once.
INTERNAL_ERROR = "InternalError"
AS_EXPECTED = "AsExpected"


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a sweep could not run: a condition reason plus a message without secrets."""

    reason: str
    message: str


def health(
    *, problem: Problem | None, suspended: bool, summary: str
) -> tuple[tuple[str, str, str, str], ...]:
    """(type, status, reason, message) for Ready and Degraded after one loop iteration."""
    if problem is not None:
        return (
            (READY, "False", problem.reason, problem.message),
            (DEGRADED, "True", problem.reason, problem.message),
        )
    if suspended:
        message = "spec.schedule.suspend is true: nothing is dispatched"
        return (
            (READY, "True", SUSPENDED, message),
            (DEGRADED, "False", AS_EXPECTED, message),
        )
    return (
        (READY, "True", SWEPT, summary),
        (DEGRADED, "False", AS_EXPECTED, "the database and the broker answer"),
    )


def merge(
    existing: Sequence[Mapping[str, Any]] | None,
    updates: Iterable[tuple[str, str, str, str]],
    *,
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """Apply updates to a conditions list, keeping ``lastTransitionTime`` when the status
    did not change and keeping conditions of other types untouched."""
    merged = {c["type"]: dict(c) for c in existing or () if "type" in c}
    for type_, status, reason, message in updates:
        previous = merged.get(type_)
        transition_time = now
        if previous is not None and previous.get("status") == status:
            transition_time = previous.get("lastTransitionTime", now)
        merged[type_] = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": transition_time,
        }
    return sorted(merged.values(), key=lambda c: str(c["type"]))


def indexed(*, create_index: str | None, table: str, table_rows: int) -> tuple[str, str, str, str]:
    """The ``Indexed`` condition: ``False`` with the statement to run when the pending query
    reads the table in proportion to its size rather than to the backlog."""
    if create_index is None:
        return (INDEXED, "True", INDEX_USED, f"pending entries of {table} are read by an index")
    return (
        INDEXED,
        "False",
        MISSING_INDEX,
        f"every sweep reads {table} (about {table_rows} rows) in proportion to its size, not "
        f"to the backlog: no index holds spec.source.pending. Create one: {create_index}",
    )


def lease_fits_workers(
    *, lease_seconds: float, heartbeat_timeout_seconds: float
) -> tuple[str, str, str, str]:
    """The ``LeaseFitsWorkers`` condition: ``False`` when ``spec.lease.timeout`` is shorter
    than the heartbeat timeout of the workers running the policy's entries. Nothing runs
    twice for it (a worker holds its attempt for the longer of the two), but the lease the
    user set is not the one in force, and a queued message not started within it is
    dispatched again."""
    if lease_seconds >= heartbeat_timeout_seconds:
        return (
            LEASE_FITS_WORKERS,
            "True",
            LEASE_ABOVE_HEARTBEAT_TIMEOUT,
            f"spec.lease.timeout ({lease_seconds:g}s) is at least the workers' heartbeat "
            f"timeout ({heartbeat_timeout_seconds:g}s)",
        )
    return (
        LEASE_FITS_WORKERS,
        "False",
        LEASE_BELOW_HEARTBEAT_TIMEOUT,
        f"spec.lease.timeout is {lease_seconds:g}s, shorter than the heartbeat timeout of the "
        f"workers running this policy's entries ({heartbeat_timeout_seconds:g}s, "
        "CELERY_RECONCILER_HEARTBEAT_TIMEOUT): their attempts are held "
        f"{heartbeat_timeout_seconds:g}s whatever the lease, and a message not started within "
        f"{lease_seconds:g}s is dispatched again — set spec.lease.timeout to at least "
        f"{heartbeat_timeout_seconds:g}s, or lower the workers' heartbeat timeout",
    )
