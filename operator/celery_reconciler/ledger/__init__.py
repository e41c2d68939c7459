"""All SQL of our own schema ``celery_reconciler``: the ledger both sides of the queue share.

The ledger lives in the user's database, in a schema we own, so that "is this entry in
flight?" and "did the worker finish it?" are answered by the same transactional store that
holds the entries — no Kubernetes access is needed on the worker side, and a claim can be
checked against the user's rows in one transaction.

The tables are described in ``celery_reconciler_worker.ledger``, which creates them.

The operator's statements, one module per concern: ``ownership`` (the owner of each policy
and its sweeps, for active-active replicas), ``survey`` (what a sweep has to do, and the
policy's rules published to workers), ``incarnations`` (ending worker processes that are
gone), ``expiry`` (lost attempts, settling, due and revived retries), ``claims`` (claiming
for dispatch, releasing claims), ``status_reads`` (counts, tallies, outcomes, history),
``retention`` (pruning what is finished); ``failures`` (what a failed statement means) and
``shared`` (the worker's half, the tables) serve them all. The names callers use are handed
on here, so ``ledger.claim_page`` and ``ledger.ensure_schema`` read as before.

Every statement is composed with ``psycopg.sql`` from constant text and identifiers; values
are always bound parameters. All times are the database's ``now()``, never a host clock, so
leases mean the same on every machine. Functions expect an autocommit connection and open
their own transaction where they need one, except ``claim``, which runs inside the caller's
claim transaction so the read of the source and the claim commit together. ``claim_page``
is one statement that embeds the source's page query (composed by ``source``) and commits
on its own.
"""

from __future__ import annotations

from celery_reconciler.ledger.claims import (
    Claim,
    ClaimedPage,
    claim,
    claim_page,
    not_held,
    queued_since,
    release_claims,
    release_queued,
)
from celery_reconciler.ledger.expiry import (
    ExpiredLeases,
    due_retries,
    expire_leases,
    retry_dead,
    settle_finished,
)
from celery_reconciler.ledger.failures import (
    OPERATOR_LOCK_TIMEOUT_SECONDS,
    OPERATOR_STATEMENT_TIMEOUT_SECONDS,
    LedgerPermissionDenied,
    database_failure,
)
from celery_reconciler.ledger.incarnations import (
    end_incarnations,
    end_pod_incarnations,
    end_silent_incarnations,
    live_pod_incarnations,
    silent_pod_incarnations,
)
from celery_reconciler.ledger.ownership import (
    FencedOut,
    begin_sweep,
    check_fence,
    end_sweep,
    forget_owner,
)
from celery_reconciler.ledger.retention import (
    Pruned,
    prune,
    prune_ended_incarnations,
)
from celery_reconciler.ledger.shared import (
    SCHEMA,
    SCHEMA_VERSION,
    DatabaseUnavailable,
    DsnInvalid,
    RunningAttempt,
    TooManyConnections,
    WorkerIdentity,
    check_dsn,
    connect,
    describe_dsn,
    dsn_secrets,
    ensure_schema,
    heartbeat,
    record_failure,
    record_success,
    register_incarnation,
    sanitize_database_error,
    sanitize_error,
    start_attempt,
    unavailable,
)
from celery_reconciler.ledger.status_reads import (
    AttemptRecord,
    Consumption,
    EntryHistory,
    LedgerCounts,
    Outcomes,
    Status,
    count_in_flight,
    counts,
    fold_successes,
    history,
    seconds_until_next_due,
    status,
)
from celery_reconciler.ledger.survey import (
    Survey,
    survey,
)

__all__ = [
    "OPERATOR_LOCK_TIMEOUT_SECONDS",
    "OPERATOR_STATEMENT_TIMEOUT_SECONDS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "AttemptRecord",
    "Claim",
    "ClaimedPage",
    "Consumption",
    "DatabaseUnavailable",
    "DsnInvalid",
    "EntryHistory",
    "ExpiredLeases",
    "FencedOut",
    "LedgerCounts",
    "LedgerPermissionDenied",
    "Outcomes",
    "Pruned",
    "RunningAttempt",
    "Status",
    "Survey",
    "TooManyConnections",
    "WorkerIdentity",
    "begin_sweep",
    "check_dsn",
    "check_fence",
    "claim",
    "claim_page",
    "connect",
    "count_in_flight",
    "counts",
    "database_failure",
    "describe_dsn",
    "dsn_secrets",
    "due_retries",
    "end_incarnations",
    "end_pod_incarnations",
    "end_silent_incarnations",
    "end_sweep",
    "ensure_schema",
    "expire_leases",
    "fold_successes",
    "forget_owner",
    "heartbeat",
    "history",
    "live_pod_incarnations",
    "not_held",
    "prune",
    "prune_ended_incarnations",
    "queued_since",
    "record_failure",
    "record_success",
    "register_incarnation",
    "release_claims",
    "release_queued",
    "retry_dead",
    "sanitize_database_error",
    "sanitize_error",
    "seconds_until_next_due",
    "settle_finished",
    "silent_pod_incarnations",
    "start_attempt",
    "status",
    "survey",
    "unavailable",
]
