"""All SQL of our own schema ``celery_reconciler``: the ledger both sides of the queue share.

The ledger lives in the user's database, in a schema we own, so that "is this entry in
flight?" and "did the worker finish it?" are answered by the same transactional store that
holds the entries — no Kubernetes access is needed on the worker side, and a claim can be
checked against the user's rows in one transaction.

The tables are described in ``celery_reconciler_worker.ledger``, which creates them.

The operator's statements live here: ``upsert_policy``, ``end_silent_incarnations``,
``end_pod_incarnations``, ``expire_leases``, ``claim`` (inside the caller's transaction),
``claim_page`` (a page of the source read and claimed in one statement),
``due_retries``, ``release_claims``, ``retry_dead``, counts, retention and history. The worker's
statements — ``register_incarnation``, ``heartbeat``, ``start_attempt``, ``record_success``,
``retry_rules``, ``record_failure`` — and what both sides must share (the schema and its
migrations, ``ensure_schema``, ``connect``, the scrubbing of secrets from errors) live in
``celery_reconciler_worker.ledger``, because a worker image installs that package without
this one; they are re-exported below, so the operator, the CLI and tests read one module.

Every statement is composed with ``psycopg.sql`` from constant text and identifiers; values
are always bound parameters. All times are the database's ``now()``, never a host clock, so
leases mean the same on every machine. Functions expect an autocommit connection and open
their own transaction where they need one, except ``claim``, which runs inside the caller's
claim transaction so the read of the source and the claim commit together. ``claim_page``
is one statement that embeds the source's page query (composed by ``source``) and commits
on its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from celery_reconciler import planning, sharding, source
from celery_reconciler import policy as policy_module
from celery_reconciler_worker import ledger as worker_ledger

# The worker's half and what both halves share, under the names callers have always used.
SCHEMA = worker_ledger.SCHEMA
SCHEMA_VERSION = worker_ledger.SCHEMA_VERSION
DatabaseUnavailable = worker_ledger.DatabaseUnavailable
DsnInvalid = worker_ledger.DsnInvalid
TooManyConnections = worker_ledger.TooManyConnections
RunningAttempt = worker_ledger.RunningAttempt
WorkerIdentity = worker_ledger.WorkerIdentity
sanitize_error = worker_ledger.sanitize_error
dsn_secrets = worker_ledger.dsn_secrets
check_dsn = worker_ledger.check_dsn
describe_dsn = worker_ledger.describe_dsn
sanitize_database_error = worker_ledger.sanitize_database_error
unavailable = worker_ledger.unavailable
connect = worker_ledger.connect
ensure_schema = worker_ledger.ensure_schema
start_attempt = worker_ledger.start_attempt
record_success = worker_ledger.record_success
record_failure = worker_ledger.record_failure
register_incarnation = worker_ledger.register_incarnation
heartbeat = worker_ledger.heartbeat

_POLICIES = worker_ledger.POLICIES
_ENTRIES = worker_ledger.ENTRIES
_ATTEMPTS = worker_ledger.ATTEMPTS
_INCARNATIONS = worker_ledger.INCARNATIONS
_TALLIES = worker_ledger.TALLIES
_OWNERS = worker_ledger.OWNERS
_SWEEPS = worker_ledger.SWEEPS


class LedgerPermissionDenied(RuntimeError):
    """The database user may not create or use our schema; the fix is a GRANT, not a retry."""


class FencedOut(RuntimeError):
    """Another replica owns the policy now (a newer fencing token in ``policy_owners``): this
    one's sweep was refused and must stop. ``current`` is the owner the ledger knows."""

    def __init__(self, message: str, *, current: sharding.Fence | None) -> None:
        super().__init__(message)
        self.current = current


@dataclasses.dataclass(frozen=True)
class Claim:
    """An entry claimed for dispatch: publish a message with ``task id = fence_token``."""

    entry_id: str
    fence_token: uuid.UUID
    again: bool = False  # dispatched before (a retry, a rescue, a lost message): runs next


@dataclasses.dataclass(frozen=True)
class ExpiredLeases:
    retry_now: int  # running attempts lost, entry pending again (counts as a failed attempt)
    dead: int  # running attempts lost with no attempts left
    unstarted: int  # queued messages never started before the lease ran out (lost messages)
    retry_ids: tuple[str, ...] = ()  # the entries of ``retry_now``, due again now


@dataclasses.dataclass(frozen=True)
class LedgerCounts:
    queued: int
    running: int
    retrying: int
    succeeded: int
    dead: int
    seconds_until_next_due: float | None  # earliest retry or lease deadline; <= 0 means now

    @property
    def in_flight(self) -> int:
        return self.queued + self.running


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    attempt: int
    fence_token: uuid.UUID
    worker: str | None
    outcome: str
    error: str | None
    dispatched_at: datetime.datetime | None
    started_at: datetime.datetime
    finished_at: datetime.datetime | None
    retry_at: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class EntryHistory:
    policy_key: str
    entry_id: str
    state: str
    attempt: int
    fence_token: uuid.UUID | None
    lease_deadline: datetime.datetime | None
    next_attempt_at: datetime.datetime | None
    worker: str | None
    last_error: str | None
    created_at: datetime.datetime
    updated_at: datetime.datetime
    attempts: tuple[AttemptRecord, ...]


def permission_denied(error: BaseException, *, dsn: str, doing: str) -> LedgerPermissionDenied:
    reason = sanitize_database_error(str(error).strip() or type(error).__name__, dsn=dsn)
    return LedgerPermissionDenied(
        f"the database user may not use the operator's schema {SCHEMA} while {doing} "
        f"({describe_dsn(dsn)}): {reason} — the ledger lives in that schema of the entries' "
        f"database, created and owned by the operator's role: GRANT CONNECT, CREATE ON "
        f"DATABASE to the user of spec.source.databaseSecretRef (--dsn or "
        "CELERY_RECONCILER_DSN for the CLI); `celery-reconciler grants` prints every role's "
        "statements"
    )


# SQLSTATE classes of a failed server or connection (connection exceptions, insufficient
# resources, operator intervention such as a shutdown, a statement or lock timeout, system
# and internal errors): they heal by themselves, and the next sweep retries.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "55", "57", "58", "XX")


def database_failure(error: psycopg.Error, *, dsn: str, doing: str) -> Exception:
    """What an error of our own statements means for the user, without secrets.

    ``LedgerPermissionDenied`` when the user lacks rights on our schema;
    ``DatabaseUnavailable`` when the connection or the server failed (or a timeout hit);
    otherwise ``error`` itself — a statement of ours the server rejects is a bug, which
    the operator reports as ``InternalError``. Pure: it reads only the error.
    """
    state = error.sqlstate or ""
    if state == "42501":
        return permission_denied(error, dsn=dsn, doing=doing)
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError) or (
        state[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
    ):
        return unavailable(error, dsn=dsn, doing=doing)
    return error


# The operator's own sessions are bounded: a statement (its reads of the user's table among
# them) may run this long, and a wait for a lock (a worker's fenced commit holding an entry
# row, a migration elsewhere) this long, before it fails and the sweep is retried with
# backoff — rather than holding a policy's loop in a thread nobody can cancel. Workers'
# sessions have neither: their task bodies may legitimately run long.
OPERATOR_STATEMENT_TIMEOUT_SECONDS = 60.0
OPERATOR_LOCK_TIMEOUT_SECONDS = 30.0

# --- operator side -------------------------------------------------------------------------

# --- sharding: the owner of each policy and its sweeps ---------------------------------------
#
# A replica sweeps a policy only while it holds the policy's Lease (``sharding``); the ledger
# makes that binding where it matters, on the writes. ``begin_sweep`` takes the policy's
# owner row if the sweeper's fencing token is accepted (``sharding.fence_accepts``: the
# compare-and-set below) and opens the sweep's interval; every claim transaction re-checks
# the row under a share lock (``check_fence``), and ``end_sweep`` closes the interval under
# the same check. A takeover must lock the row, so it waits for a claim transaction of the
# previous owner to commit, and closes that owner's open interval at its own clock time:
# after it, the previous owner can commit nothing, and intervals of two owners never
# overlap — which ``sweeps`` shows. Steps of a sweep that are idempotent and already run
# concurrently with rescues (expiry, settling, counting) are not fenced: the fence guards
# what must happen once, claiming and dispatching.

SWEEP_HISTORY_SECONDS = 86400

_TAKE_OWNERSHIP = sql.SQL(
    """
    INSERT INTO {owners} AS o (policy_key, holder, token)
    VALUES (%(policy_key)s, %(holder)s, %(token)s)
    ON CONFLICT (policy_key) DO UPDATE
        SET holder = excluded.holder, token = excluded.token, since = clock_timestamp()
        WHERE o.token < excluded.token OR (o.token = excluded.token AND o.holder = excluded.holder)
    RETURNING policy_key
    """
).format(owners=_OWNERS)
_CURRENT_OWNER = sql.SQL(
    "SELECT holder, token FROM {owners} WHERE policy_key = %(policy_key)s"
).format(owners=_OWNERS)
_CHECK_OWNER = sql.SQL(
    "SELECT 1 FROM {owners} WHERE policy_key = %(policy_key)s AND holder = %(holder)s "
    "AND token = %(token)s FOR SHARE"
).format(owners=_OWNERS)
_CLOSE_PREDECESSORS = sql.SQL(
    """
    UPDATE {sweeps} SET finished_at = clock_timestamp(), ended = 'taken_over'
    WHERE policy_key = %(policy_key)s AND finished_at IS NULL
      AND (holder, token) IS DISTINCT FROM (%(holder)s, %(token)s::bigint)
    """
).format(sweeps=_SWEEPS)
_OPEN_SWEEP = sql.SQL(
    "INSERT INTO {sweeps} (policy_key, holder, token) VALUES (%(policy_key)s, %(holder)s, "
    "%(token)s) RETURNING id"
).format(sweeps=_SWEEPS)
_CLOSE_SWEEP = sql.SQL(
    "UPDATE {sweeps} SET finished_at = clock_timestamp(), ended = %(ended)s "
    "WHERE id = %(id)s AND finished_at IS NULL"
).format(sweeps=_SWEEPS)
_PRUNE_SWEEPS = sql.SQL(
    """
    DELETE FROM {sweeps} WHERE id IN (
        SELECT id FROM {sweeps} WHERE policy_key = %(policy_key)s
          AND started_at < now() - make_interval(secs => %(seconds)s)
        ORDER BY started_at LIMIT 1000)
    """
).format(sweeps=_SWEEPS)


# A deleted policy's owner row goes with it: left behind, its token — however it got there —
# would refuse every Lease of a new policy of the same name that starts below it. The row
# has no uid of its own; the policy's recorded work (``overlaps``) has, so a removal that
# comes after a recreated policy of that name recorded its work leaves that policy's row.
_FORGET_OWNER = sql.SQL(
    """
    DELETE FROM {owners} WHERE policy_key = %(policy_key)s
      AND NOT EXISTS (SELECT 1 FROM {work} WHERE policy_key = %(policy_key)s
                                          AND policy_uid <> %(policy_uid)s)
    """
).format(owners=_OWNERS, work=worker_ledger.POLICY_WORK)


def forget_owner(conn: psycopg.Connection[Any], *, policy_key: str, policy_uid: str) -> None:
    """Remove the owner row of a policy that no longer exists (that uid of that name)."""
    conn.execute(_FORGET_OWNER, {"policy_key": policy_key, "policy_uid": policy_uid})


def _fence_params(fence: sharding.Fence) -> dict[str, Any]:
    return {"policy_key": fence.policy_key, "holder": fence.holder, "token": fence.token}


def _fenced_out(conn: psycopg.Connection[Any], fence: sharding.Fence) -> FencedOut:
    row = conn.execute(_CURRENT_OWNER, _fence_params(fence)).fetchone()
    current = None if row is None else sharding.Fence(fence.policy_key, row[0], int(row[1]))
    now = "nobody" if current is None else f"{current.holder} (token {current.token})"
    return FencedOut(
        f"policy {fence.policy_key} is owned by {now} in the ledger: this replica "
        f"({fence.holder}, token {fence.token}) lost its Lease and stops sweeping it",
        current=current,
    )


def begin_sweep(conn: psycopg.Connection[Any], fence: sharding.Fence) -> int:
    """Take (or keep) the policy's owner row and open a sweep interval; its id.

    Raises ``FencedOut`` when the ledger knows a newer owner."""
    with conn.transaction():
        if conn.execute(_TAKE_OWNERSHIP, _fence_params(fence)).fetchone() is None:
            raise _fenced_out(conn, fence)
        conn.execute(_CLOSE_PREDECESSORS, _fence_params(fence))
        row = conn.execute(_OPEN_SWEEP, _fence_params(fence)).fetchone()
        assert row is not None
        conn.execute(
            _PRUNE_SWEEPS, {"policy_key": fence.policy_key, "seconds": SWEEP_HISTORY_SECONDS}
        )
    return int(row[0])


def check_fence(conn: psycopg.Connection[Any], fence: sharding.Fence) -> None:
    """Inside a claim transaction: hold the owner row (shared) until the commit, or raise
    ``FencedOut`` — a takeover then waits for this transaction, or this one sees it."""
    if conn.execute(_CHECK_OWNER, _fence_params(fence)).fetchone() is None:
        raise _fenced_out(conn, fence)


def end_sweep(
    conn: psycopg.Connection[Any], fence: sharding.Fence, *, sweep_id: int, finished: bool
) -> None:
    """Close the interval, if this replica still owns the policy (else a takeover closed it)."""
    with conn.transaction():
        if conn.execute(_CHECK_OWNER, _fence_params(fence)).fetchone() is None:
            return
        conn.execute(_CLOSE_SWEEP, {"id": sweep_id, "ended": "finished" if finished else "failed"})


_UPSERT_POLICY = sql.SQL(
    """
    INSERT INTO {policies} AS p (policy_key, max_attempts, initial_delay_seconds,
        backoff_factor, max_delay_seconds, jitter, lease_seconds, task_name, queue)
    VALUES (%(policy_key)s, %(max_attempts)s, %(initial)s, %(factor)s, %(max_delay)s,
        %(jitter)s, %(lease)s, %(task_name)s, %(queue)s)
    ON CONFLICT (policy_key) DO UPDATE SET
        max_attempts = EXCLUDED.max_attempts,
        initial_delay_seconds = EXCLUDED.initial_delay_seconds,
        backoff_factor = EXCLUDED.backoff_factor,
        max_delay_seconds = EXCLUDED.max_delay_seconds,
        jitter = EXCLUDED.jitter,
        lease_seconds = EXCLUDED.lease_seconds,
        task_name = EXCLUDED.task_name,
        queue = EXCLUDED.queue,
        updated_at = now()
    WHERE (p.max_attempts, p.initial_delay_seconds, p.backoff_factor, p.max_delay_seconds,
           p.jitter, p.lease_seconds, p.task_name, p.queue)
        IS DISTINCT FROM
          (EXCLUDED.max_attempts, EXCLUDED.initial_delay_seconds, EXCLUDED.backoff_factor,
           EXCLUDED.max_delay_seconds, EXCLUDED.jitter, EXCLUDED.lease_seconds,
           EXCLUDED.task_name, EXCLUDED.queue)
    """
).format(policies=_POLICIES)


def upsert_policy(conn: psycopg.Connection[Any], policy: policy_module.Policy) -> None:
    """Publish the policy's retry and lease rules to workers (a no-op write when unchanged)."""
    conn.execute(_UPSERT_POLICY, _rules(policy))


def _rules(policy: policy_module.Policy) -> dict[str, Any]:
    return {
        "policy_key": policy.key,
        "max_attempts": policy.retry.max_attempts,
        "initial": policy.retry.initial_delay_seconds,
        "factor": policy.retry.backoff_factor,
        "max_delay": policy.retry.max_delay_seconds,
        "jitter": policy.retry.jitter,
        "lease": policy.lease.timeout_seconds,
        "task_name": policy.task.name,
        "queue": policy.task.queue,
    }


# A lost running attempt is a failed attempt (the worker died or the body overran), so it
# consumes the attempt: a poison entry that kills its worker ends dead, not in a crash loop.
# An attempt is lost when the incarnation running it has ended (a pod event proved its
# container dead, or it stopped heartbeating and so stopped its own bodies), or — the backstop
# for workers of the previous schema, which have no incarnation — when its lease ran out.
_EXPIRE_LOST = sql.SQL(
    """
    WITH lost AS (
        UPDATE {entries} e SET
            state = CASE WHEN e.attempt >= p.max_attempts THEN 'dead' ELSE 'retry_wait' END,
            next_attempt_at = CASE WHEN e.attempt >= p.max_attempts THEN NULL ELSE now() END,
            last_error = coalesce(
                (SELECT 'the worker process running this attempt ended (' || i.ended_reason
                        || ')'
                 FROM {incarnations} i WHERE i.id = e.incarnation AND i.ended_at IS NOT NULL),
                'lease expired while running (the worker died, was restarted, or the body ran '
                || 'past spec.lease.timeout without heartbeats)')
                || ' on worker ' || coalesce(e.worker, 'an unknown worker'),
            lease_deadline = NULL,
            finished_at = now(),
            updated_at = now()
        FROM {policies} p
        WHERE p.policy_key = e.policy_key
          AND e.policy_key = %(policy_key)s
          AND e.state = 'running'
          AND (e.lease_deadline <= now()
               OR EXISTS (SELECT 1 FROM {incarnations} i
                          WHERE i.id = e.incarnation AND i.ended_at IS NOT NULL))
        RETURNING e.policy_key, e.entry_id, e.attempt, e.fence_token, e.worker,
            e.dispatched_at, e.started_at, e.incarnation, e.state, e.last_error
    ), {history}
    SELECT entry_id, state FROM lost
    """
).format(
    entries=_ENTRIES,
    policies=_POLICIES,
    incarnations=_INCARNATIONS,
    history=worker_ledger.attempt_ended(
        "lost",
        outcome="lost",
        error="ended.last_error",
        retry_at="CASE WHEN ended.state = 'dead' THEN NULL ELSE now() END",
    ),
)
_COUNT_UNSTARTED_EXPIRED = sql.SQL(
    "SELECT count(*) FROM {entries} WHERE policy_key = %s AND state = 'queued' "
    "AND lease_deadline <= now()"
).format(entries=_ENTRIES)


def expire_leases(conn: psycopg.Connection[Any], *, policy_key: str) -> ExpiredLeases:
    """Turn lost running attempts into failed ones; count lost messages.

    Lost: the incarnation running it has ended, or (backstop) its lease ran out. Queued rows
    whose lease ran out need no write: they are eligible for the next claim as they are (their
    message was lost, so no attempt is charged).
    """
    with conn.transaction():
        lost = conn.execute(_EXPIRE_LOST, {"policy_key": policy_key}).fetchall()
        unstarted = conn.execute(_COUNT_UNSTARTED_EXPIRED, [policy_key]).fetchone()
    assert unstarted is not None
    retry_ids = tuple(entry_id for entry_id, state in lost if state == "retry_wait")
    return ExpiredLeases(
        retry_now=len(retry_ids),
        dead=len(lost) - len(retry_ids),
        unstarted=unstarted[0],
        retry_ids=retry_ids,
    )


_END_SILENT_INCARNATIONS = sql.SQL(
    """
    UPDATE {incarnations} SET ended_at = now(),
        ended_reason = 'no heartbeat for ' || round(heartbeat_timeout_seconds::numeric, 1)
            || ' s: it stopped its own bodies'
    WHERE ended_at IS NULL AND pod_uid IS NULL
      AND heartbeat_at < now() - make_interval(secs => heartbeat_timeout_seconds)
    """
).format(incarnations=_INCARNATIONS)
# Silent processes that name a Pod and hold running entries of a policy: their Pod, not
# their silence, says whether they are gone (``planning.judge_silent``).
_SILENT_POD_INCARNATIONS = sql.SQL(
    """
    SELECT i.id, i.container_id, i.container_name, i.container_started_at, i.started_at,
        i.pod_uid, i.pod_name, i.pod_namespace, i.hostname, i.pid,
        EXTRACT(EPOCH FROM now() - i.heartbeat_at)
    FROM {incarnations} i
    WHERE i.ended_at IS NULL AND i.pod_uid IS NOT NULL
      AND i.heartbeat_at < now() - make_interval(secs => i.heartbeat_timeout_seconds)
      AND EXISTS (SELECT 1 FROM {entries} e
                  WHERE e.policy_key = %s AND e.state = 'running' AND e.incarnation = i.id)
    ORDER BY i.heartbeat_at
    LIMIT 100
    """
).format(incarnations=_INCARNATIONS, entries=_ENTRIES)
# Ended incarnations are kept a day for ``explain`` and people, then pruned in batches.
_PRUNE_ENDED_INCARNATIONS = sql.SQL(
    """
    DELETE FROM {incarnations} WHERE id IN (
        SELECT id FROM {incarnations} WHERE ended_at < now() - interval '1 day' LIMIT 1000)
    """
).format(incarnations=_INCARNATIONS)


def end_silent_incarnations(conn: psycopg.Connection[Any]) -> int:
    """End every incarnation without a pod identity whose heartbeat is older than its
    timeout; how many ended.

    Such a worker (outside Kubernetes: nobody else can confirm its death) has, by its own
    rule, stopped its bodies at half the timeout, or it is dead, so the operator may hand
    its attempts to someone else. A process that names a Pod is never ended by silence:
    see ``silent_pod_incarnations``.
    """
    return conn.execute(_END_SILENT_INCARNATIONS).rowcount


def silent_pod_incarnations(
    conn: psycopg.Connection[Any], *, policy_key: str
) -> list[planning.SilentIncarnation]:
    """Silent incarnations that name a Pod and hold running entries of this policy (the
    hundred silent longest), for the operator to judge by their Pods."""
    return [
        planning.SilentIncarnation(
            incarnation=planning.LiveIncarnation(
                id=str(row[0]),
                container_id=row[1],
                container_name=row[2],
                container_started_at=row[3],
                started_at=row[4],
            ),
            pod_uid=row[5],
            pod_name=row[6],
            pod_namespace=row[7],
            hostname=row[8],
            pid=row[9],
            silent_seconds=float(row[10]),
        )
        for row in conn.execute(_SILENT_POD_INCARNATIONS, [policy_key])
    ]


def prune_ended_incarnations(conn: psycopg.Connection[Any]) -> int:
    """Delete up to 1000 incarnations that ended more than a day ago; how many."""
    return conn.execute(_PRUNE_ENDED_INCARNATIONS).rowcount


_LIVE_POD_INCARNATIONS = sql.SQL(
    """
    SELECT id, container_id, container_name, container_started_at, started_at
    FROM {incarnations} WHERE ended_at IS NULL AND pod_uid = %s
    """
).format(incarnations=_INCARNATIONS)
_END_INCARNATIONS = sql.SQL(
    """
    UPDATE {incarnations} i SET ended_at = now(), ended_reason = ended.reason
    FROM unnest(%(ids)s::uuid[], %(reasons)s::text[]) AS ended(id, reason)
    WHERE i.id = ended.id AND i.ended_at IS NULL
    """
).format(incarnations=_INCARNATIONS)


def live_pod_incarnations(
    conn: psycopg.Connection[Any], *, pod_uid: str
) -> list[planning.LiveIncarnation]:
    """The incarnations of one pod that have not ended, as ``planning`` judges them."""
    return [
        planning.LiveIncarnation(
            id=str(row[0]),
            container_id=row[1],
            container_name=row[2],
            container_started_at=row[3],
            started_at=row[4],
        )
        for row in conn.execute(_LIVE_POD_INCARNATIONS, [pod_uid])
    ]


def end_incarnations(
    conn: psycopg.Connection[Any], *, ended: Sequence[planning.EndedIncarnation]
) -> int:
    """End these incarnations, each with its reason; how many had not ended yet."""
    if not ended:
        return 0
    return conn.execute(
        _END_INCARNATIONS,
        {
            "ids": [incarnation.id for incarnation in ended],
            "reasons": [incarnation.reason for incarnation in ended],
        },
    ).rowcount


def end_pod_incarnations(conn: psycopg.Connection[Any], *, ending: planning.PodEnding) -> int:
    """End exactly the incarnations a pod event proves ended (``planning.ended_incarnations``),
    in the caller's transaction; how many."""
    live = live_pod_incarnations(conn, pod_uid=ending.pod_uid)
    return end_incarnations(
        conn, ended=planning.ended_incarnations(ending=ending, incarnations=live)
    )


# A ledger row that may be claimed again: its message was lost (queued, lease run out), its
# retry is due, or it succeeded (claimed again only if the source shows it pending again).
_CLAIMABLE = sql.SQL(
    """(state = 'succeeded'
         OR (state = 'queued' AND lease_deadline <= now())
         OR (state = 'retry_wait' AND next_attempt_at <= now()))"""
)

# One unique-key probe per candidate id, forced by LATERAL: a plain ``entry_id = ANY(...)``
# lets the planner scan every row of the policy when the ledger's statistics are stale
# (a fresh ledger filling up within one big sweep), which made each page cost O(ledger).
_LOCK_CLAIMABLE = sql.SQL(
    """
    SELECT e.ctid, e.entry_id, e.state, e.counted
    FROM unnest(%(entry_ids)s::text[]) AS candidate(entry_id)
    CROSS JOIN LATERAL (
        SELECT ctid, entry_id, state, counted FROM {entries}
        WHERE policy_key = %(policy_key)s
          AND entry_id = candidate.entry_id
          AND {claimable}
        FOR UPDATE SKIP LOCKED
    ) AS e
    """
).format(entries=_ENTRIES, claimable=_CLAIMABLE)

# The rows are locked by this transaction, so their ctids cannot change under us: a TID
# scan updates exactly them, whatever the planner believes about the table's size.
_CLAIM_LOCKED = sql.SQL(
    """
    UPDATE {entries} SET
        state = 'queued',
        fence_token = gen_random_uuid(),
        lease_deadline = now() + make_interval(secs => %(lease_seconds)s),
        next_attempt_at = NULL,
        dispatched_at = now(),
        attempt = CASE WHEN state = 'succeeded' THEN 0 ELSE attempt END,
        incarnation = NULL,
        counted = false,
        last_error = CASE WHEN state = 'succeeded' THEN NULL ELSE last_error END,
        updated_at = now()
    WHERE ctid = ANY(%(row_ids)s::tid[])
      AND policy_key = %(policy_key)s
      AND entry_id = ANY(%(entry_ids)s::text[])
    RETURNING entry_id, fence_token
    """
).format(entries=_ENTRIES)

_CLAIM_NEW = sql.SQL(
    """
    INSERT INTO {entries} (policy_key, entry_id, state, fence_token, lease_deadline,
        dispatched_at)
    SELECT %(policy_key)s, new_id, 'queued', gen_random_uuid(),
        now() + make_interval(secs => %(lease_seconds)s), now()
    FROM unnest(%(entry_ids)s::text[]) AS new_id
    ON CONFLICT (policy_key, entry_id) DO NOTHING
    RETURNING entry_id, fence_token
    """
).format(entries=_ENTRIES)


def claim(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    entry_ids: Sequence[str],
    lease_seconds: float,
    still_pending: Callable[[Sequence[str]], set[str]],
    sweeper: sharding.Fence | None = None,
) -> list[Claim]:
    """Claim the eligible ones of ``entry_ids`` (pending in the source) with fresh fences.

    Must run inside the caller's transaction; the caller commits, and only then publishes.
    With a ``sweeper`` (active-active replicas), only while the ledger names it the
    policy's owner (``check_fence``), else ``FencedOut``.

    Eligible: no ledger row yet; ``queued`` with an expired lease (message lost);
    ``retry_wait`` whose retry is due; ``succeeded`` while the source predicate holds again.
    Rows locked by someone else are skipped (``SKIP LOCKED``), never waited for.

    New entries are inserted first, and only the ids the insert did not take are looked
    up for a claimable row: most of a backlog has no ledger row yet, so a page of them
    costs one statement instead of a lookup of every id followed by the insert. An id the
    insert skipped has a row (ours to lock, or one another transaction committed while the
    insert waited for it), so nothing is claimed twice and nothing eligible is missed.

    The ``succeeded`` case is re-checked against the source *after* the row lock is taken,
    through ``still_pending`` (a fresh statement, hence a fresh snapshot under READ
    COMMITTED): a worker commits the body's write before it records success, so once we hold
    the succeeded row, the body's write is visible and a just-finished entry is not mistaken
    for "pending again".
    """
    if not entry_ids:
        return []
    if sweeper is not None:
        check_fence(conn, sweeper)
    ids = list(entry_ids)
    claims: dict[str, Claim] = {
        entry_id: Claim(entry_id, fence)
        for entry_id, fence in conn.execute(
            _CLAIM_NEW,
            {
                "policy_key": policy_key,
                "entry_ids": source.id_array_literal(ids),
                "lease_seconds": lease_seconds,
            },
        ).fetchall()
    }
    existing = [entry_id for entry_id in ids if entry_id not in claims]
    if existing:
        claims.update(
            _claim_existing(
                conn,
                policy_key=policy_key,
                entry_ids=existing,
                lease_seconds=lease_seconds,
                still_pending=still_pending,
            )
        )
    # Keep the source's keyset order, so dispatch order follows spec.source.orderBy.
    return [claims[entry_id] for entry_id in ids if entry_id in claims]


def _claim_existing(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    entry_ids: list[str],
    lease_seconds: float,
    still_pending: Callable[[Sequence[str]], set[str]],
) -> dict[str, Claim]:
    """``claim``'s second half: lock the claimable ledger rows of ``entry_ids`` and give
    them fresh fences (``again``: they were dispatched before)."""
    locked = conn.execute(
        _LOCK_CLAIMABLE, {"policy_key": policy_key, "entry_ids": source.id_array_literal(entry_ids)}
    ).fetchall()
    row_ids = {entry_id: row_id for row_id, entry_id, _, _ in locked}
    tallied = {entry_id for _, entry_id, state, counted in locked if counted}
    reclaim = [entry_id for _, entry_id, state, _ in locked if state != "succeeded"]
    succeeded = [entry_id for _, entry_id, state, _ in locked if state == "succeeded"]
    if succeeded:
        pending_again = still_pending(succeeded)
        reclaim.extend(entry_id for entry_id in succeeded if entry_id in pending_again)
    if not reclaim:
        return {}
    claims = {
        entry_id: Claim(entry_id, fence, again=True)
        for entry_id, fence in conn.execute(
            _CLAIM_LOCKED,
            {
                "policy_key": policy_key,
                "entry_ids": source.id_array_literal(reclaim),
                "row_ids": [row_ids[entry_id] for entry_id in reclaim],
                "lease_seconds": lease_seconds,
            },
        ).fetchall()
    }
    untallied = sum(1 for entry_id in claims if entry_id in tallied)
    if untallied:  # pending again: no longer succeeded, so out of the tally
        conn.execute(_UNTALLY, {"policy_key": policy_key, "count": untallied})
    return claims


@dataclasses.dataclass(frozen=True)
class ClaimedPage:
    """A page of the source read and claimed by ``claim_page``."""

    claims: list[Claim]  # in the page's keyset order
    size: int  # entries the page held, claimed or not
    last_key: tuple[Any, ...] | None  # the keyset position after it (None: empty page)


_NOT_HELD = sql.SQL(
    """NOT EXISTS (
        SELECT 1 FROM {entries} AS held
        WHERE held.policy_key = %s AND held.entry_id = {entry_id} AND ({claimable}) IS NOT TRUE
    )"""
)


def not_held(entry_id: sql.Composable) -> sql.Composed:
    """For ``source.page_query``'s ``skipping``: true of an entry the ledger does not hold —
    no row, or a row ``claim`` would claim — so a page skips what is in flight, waiting for
    its retry or dead. One unique-key probe per row read; its placeholder is the policy key.

    Why in the page: in the steady state of a backlog larger than ``maxInFlight`` the
    oldest pending rows are all in flight, and a page that returned them read a page per
    ``batchSize`` of them before it reached one it could claim."""
    return _NOT_HELD.format(entries=_ENTRIES, entry_id=entry_id, claimable=_CLAIMABLE)


def claim_page(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    page_query: bytes,
    page_params: Sequence[Any],
    key_width: int,
    lease_seconds: float,
    still_pending: Callable[[Sequence[str]], set[str]],
    sweeper: sharding.Fence | None = None,
    claim_limit: int | None = None,
) -> ClaimedPage:
    """Read a page of the source and claim it, as ``claim`` would claim its ids, mostly in
    ONE statement — its own transaction, committed when it returns (autocommit).

    ``page_query`` (rendered for ``conn``; positional parameters ``page_params``) yields the
    ``key_width`` keyset columns and then the id as text, in keyset order
    (``source.page_query_text``). Only its first ``claim_limit`` rows (all without one) are
    candidates: the budget left bounds the claims, never the rows a page reads, and the
    page's ``last_key`` is the last candidate's, so the next page starts after the rows
    looked at. The statement
    inserts the page's new entries with fresh fences and returns the page, the new claims
    and the ids whose existing ledger row is claimable (as in ``claim``: a lost message,
    a due retry, a success pending again); only when there are such ids does a second
    transaction lock and claim them (``claim``'s way, with its re-check of successes).
    Claims are committed before this returns, so the caller may publish at once.

    Why one statement: a sweep claims page after page while the previous page is published
    in a thread; every round trip of the claim is a wake-up that waits for the interpreter
    the publisher holds. Read, insert and commit as one statement instead of BEGIN, read,
    insert and COMMIT made a 100k backlog's sweep about a third faster.

    With a ``sweeper``, the statement holds the policy's owner row (shared, as
    ``check_fence`` does) and inserts only if the row names the sweeper; else nothing is
    claimed and ``FencedOut`` is raised. An empty page locks nothing (as ``claim`` of no
    ids checks no fence), so an idle sweep writes nothing.
    """
    statement = _claim_page_text(
        conn, page_query=page_query, key_width=key_width, fenced=sweeper is not None
    )
    params: list[Any] = [*page_params, claim_limit]
    if sweeper is not None:
        params += [sweeper.policy_key, sweeper.holder, sweeper.token]
    params += [policy_key, lease_seconds, policy_key]
    rows = conn.execute(statement, params).fetchall()
    page = [row for row in rows if row[0] == "page"]
    fences = {row[-2]: row[-1] for row in rows if row[0] == "new"}
    known = [row[-2] for row in rows if row[0] == "known"]
    if sweeper is not None and page and not any(row[0] == "owner" for row in rows):
        raise _fenced_out(conn, sweeper)
    claims = {entry_id: Claim(entry_id, fence) for entry_id, fence in fences.items()}
    if known:
        with conn.transaction():
            if sweeper is not None:
                check_fence(conn, sweeper)
            claims.update(
                _claim_existing(
                    conn,
                    policy_key=policy_key,
                    entry_ids=known,
                    lease_seconds=lease_seconds,
                    still_pending=still_pending,
                )
            )
    candidates = page if claim_limit is None else page[:claim_limit]
    return ClaimedPage(
        claims=[claims[row[-2]] for row in candidates if row[-2] in claims],
        size=len(page),
        last_key=tuple(candidates[-1][1:-2]) if candidates else None,
    )


# Rendering a statement this size costs more than an idle sweep's reading of an empty page
# (see source._text): its text is kept by what it is made of.
_CLAIM_PAGE_TEXTS_KEPT = 4096
_claim_page_texts: dict[tuple[bytes, int, bool, str], bytes] = {}


def _claim_page_text(
    conn: psycopg.Connection[Any], *, page_query: bytes, key_width: int, fenced: bool
) -> bytes:
    key = (page_query, key_width, fenced, conn.info.encoding)
    text = _claim_page_texts.get(key)
    if text is None:
        page = sql.SQL(page_query.decode(conn.info.encoding))
        text = _claim_page_statement(page, key_width=key_width, fenced=fenced).as_bytes(conn)
        if len(_claim_page_texts) >= _CLAIM_PAGE_TEXTS_KEPT:
            _claim_page_texts.clear()  # policies come and go: forget them all now and then
        _claim_page_texts[key] = text
    return text


def _claim_page_statement(
    page_query: sql.Composable, *, key_width: int, fenced: bool
) -> sql.Composed:
    keys = [sql.Identifier(f"key{index}") for index in range(key_width)]
    owner_check = (
        sql.SQL(
            "owner AS (SELECT 1 FROM {owners} WHERE policy_key = %s AND holder = %s "
            "AND token = %s AND EXISTS (SELECT 1 FROM page) FOR SHARE), "
        ).format(owners=_OWNERS)
        if fenced
        else sql.SQL("")
    )
    return sql.SQL(
        """
        WITH page AS MATERIALIZED (
            SELECT * FROM ({page_query}) AS page({keys}, entry_id)
        ),
        candidate AS MATERIALIZED (
            SELECT entry_id FROM page ORDER BY {keys} LIMIT %s
        ),
        {owner_check}
        inserted AS (
            INSERT INTO {entries} (policy_key, entry_id, state, fence_token, lease_deadline,
                dispatched_at)
            SELECT %s, candidate.entry_id, 'queued', gen_random_uuid(),
                now() + make_interval(secs => %s), now()
            FROM candidate {owned}
            ON CONFLICT (policy_key, entry_id) DO NOTHING
            RETURNING entry_id, fence_token
        ),
        known AS (
            SELECT e.entry_id FROM candidate CROSS JOIN LATERAL (
                SELECT entry_id FROM {entries}
                WHERE policy_key = %s AND entry_id = candidate.entry_id AND {claimable}
            ) AS e
            WHERE candidate.entry_id NOT IN (SELECT entry_id FROM inserted)
        )
        SELECT * FROM (
            (SELECT 'page' AS kind, {keys}, entry_id, NULL::uuid AS fence_token
             FROM page ORDER BY {keys})
            UNION ALL
            SELECT 'new', {nulls}, entry_id, fence_token FROM inserted
            UNION ALL
            SELECT 'known', {nulls}, entry_id, NULL FROM known
            {owner_row}
        ) AS result
        """
    ).format(
        page_query=page_query,
        keys=sql.SQL(", ").join(keys),
        owner_check=owner_check,
        entries=_ENTRIES,
        claimable=_CLAIMABLE,
        owned=sql.SQL("WHERE EXISTS (SELECT 1 FROM owner)" if fenced else ""),
        nulls=sql.SQL(", ").join(sql.NULL for _ in keys),
        owner_row=(
            sql.SQL("UNION ALL SELECT 'owner', {nulls}, NULL, NULL FROM owner").format(
                nulls=sql.SQL(", ").join(sql.NULL for _ in keys)
            )
            if fenced
            else sql.SQL("")
        ),
    )


_UNTALLY = sql.SQL(
    "UPDATE {tallies} SET succeeded = succeeded - %(count)s WHERE policy_key = %(policy_key)s"
).format(tallies=_TALLIES)

_RELEASE_CLAIMS = sql.SQL(
    """
    UPDATE {entries} SET lease_deadline = now(), updated_at = now()
    WHERE fence_token = ANY(%s::uuid[]) AND state = 'queued'
    RETURNING entry_id
    """
).format(entries=_ENTRIES)


def release_claims(
    conn: psycopg.Connection[Any], *, fence_tokens: Sequence[uuid.UUID]
) -> list[str]:
    """Make queued entries eligible again at once, instead of after the lease: claims whose
    publish failed, or whose message is gone (a worker took it and died before starting it,
    or it was lost on the way). Returns their entry ids.

    Safe even if some of those messages did reach the broker: the next claim writes a new
    fence token, and a worker drops any delivery whose task id is not the current fence.
    """
    if not fence_tokens:
        return []
    return [row[0] for row in conn.execute(_RELEASE_CLAIMS, [list(fence_tokens)])]


_QUEUED_SINCE = sql.SQL(
    """
    SELECT fence_token::text FROM {entries}
    WHERE policy_key = %s AND state = 'queued' AND lease_deadline > now()
      AND dispatched_at < now() - make_interval(secs => %s)
    """
).format(entries=_ENTRIES)


def queued_since(conn: psycopg.Connection[Any], *, policy_key: str, seconds: float) -> list[str]:
    """Fence tokens of entries published more than ``seconds`` ago and not started yet."""
    return [row[0] for row in conn.execute(_QUEUED_SINCE, [policy_key, seconds])]


_RELEASE_QUEUED = sql.SQL(
    """
    UPDATE {entries} SET lease_deadline = now(), updated_at = now()
    WHERE policy_key = %s AND state = 'queued' AND lease_deadline > now()
    """
).format(entries=_ENTRIES)


def release_queued(conn: psycopg.Connection[Any], *, policy_key: str) -> int:
    """Make every queued (published, not started) entry eligible now: its message is gone.

    Used when the broker restarted without its queues. A message that did survive carries
    the old fence token and is dropped by the worker, so releasing is always safe.
    """
    return conn.execute(_RELEASE_QUEUED, [policy_key]).rowcount


_COUNT_IN_FLIGHT = sql.SQL(
    "SELECT count(*) FROM {entries} WHERE policy_key = %s AND state IN ('queued', 'running') "
    "AND lease_deadline > now()"
).format(entries=_ENTRIES)


def count_in_flight(conn: psycopg.Connection[Any], *, policy_key: str) -> int:
    """Entries dispatched or running under a live lease (what ``maxInFlight`` limits)."""
    row = conn.execute(_COUNT_IN_FLIGHT, [policy_key]).fetchone()
    assert row is not None
    return int(row[0])


# When the loop must look again: the earliest due retry, lease deadline, or the moment a
# running attempt's incarnation would be silent for longer than its heartbeat timeout.
_NEXT_DUE = sql.SQL(
    """
    min(CASE
        WHEN e.state = 'retry_wait' THEN e.next_attempt_at
        WHEN e.state = 'queued' THEN e.lease_deadline
        WHEN e.state = 'running' THEN least(e.lease_deadline,
            (SELECT i.heartbeat_at + make_interval(secs => i.heartbeat_timeout_seconds)
             FROM {incarnations} i WHERE i.id = e.incarnation))
    END)
    """
).format(incarnations=_INCARNATIONS)
_SECONDS_UNTIL_NEXT_DUE = sql.SQL(
    """
    SELECT EXTRACT(EPOCH FROM {next_due} - now())
    FROM {entries} e
    WHERE e.policy_key = %s AND e.state IN ('queued', 'running', 'retry_wait')
    """
).format(entries=_ENTRIES, next_due=_NEXT_DUE)


def seconds_until_next_due(conn: psycopg.Connection[Any], *, policy_key: str) -> float | None:
    """Time until the earliest retry falls due or lease runs out (None: nothing scheduled)."""
    row = conn.execute(_SECONDS_UNTIL_NEXT_DUE, [policy_key]).fetchone()
    return None if row is None or row[0] is None else float(row[0])


_UNSETTLED = sql.SQL(
    """
    SELECT entry_id FROM {entries}
    WHERE policy_key = %s AND state IN ('retry_wait', 'dead')
    ORDER BY updated_at LIMIT %s
    """
).format(entries=_ENTRIES)

_MARK_SETTLED = sql.SQL(
    """
    UPDATE {entries} SET state = 'succeeded', next_attempt_at = NULL, updated_at = now(),
        finished_at = coalesce(finished_at, now())
    WHERE policy_key = %s AND entry_id = ANY(%s) AND state IN ('retry_wait', 'dead')
    """
).format(entries=_ENTRIES)


def settle_finished(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    still_pending: Callable[[Sequence[str]], set[str]],
    limit: int = 10_000,
) -> int:
    """Mark ``retry_wait`` and ``dead`` rows succeeded when the source says the entry is
    processed.

    This happens when a body committed its work but the worker died (or lost its lease)
    before recording success: the entry is done, and counting it as retrying or dead-lettered
    would lie.
    """
    waiting = [row[0] for row in conn.execute(_UNSETTLED, [policy_key, limit])]
    if not waiting:
        return 0
    pending = still_pending(waiting)
    done = [entry_id for entry_id in waiting if entry_id not in pending]
    if not done:
        return 0
    return conn.execute(_MARK_SETTLED, [policy_key, done]).rowcount


_DUE_RETRIES = sql.SQL(
    """
    SELECT entry_id FROM {entries}
    WHERE policy_key = %s AND state = 'retry_wait' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT %s
    """
).format(entries=_ENTRIES)


def due_retries(conn: psycopg.Connection[Any], *, policy_key: str, limit: int) -> list[str]:
    """Entries whose retry is due, the longest-waiting first: dispatched ahead of the backlog."""
    if limit <= 0:
        return []
    return [row[0] for row in conn.execute(_DUE_RETRIES, [policy_key, limit])]


_RETRY_DEAD = sql.SQL(
    """
    WITH revived AS (
        UPDATE {entries} SET state = 'retry_wait', attempt = 0, next_attempt_at = now(),
            updated_at = now()
        WHERE policy_key = %(policy_key)s AND state = 'dead'
          AND (%(entry_ids)s::text[] IS NULL OR entry_id = ANY(%(entry_ids)s::text[]))
        RETURNING 1
    )
    SELECT count(*) FROM revived
    """
).format(entries=_ENTRIES)


def retry_dead(
    conn: psycopg.Connection[Any], *, policy_key: str, entry_ids: Sequence[str] | None = None
) -> int:
    """Give dead entries (all, or the given ids) a fresh set of attempts, due now."""
    row = conn.execute(
        _RETRY_DEAD,
        {"policy_key": policy_key, "entry_ids": None if entry_ids is None else list(entry_ids)},
    ).fetchone()
    assert row is not None
    return int(row[0])


# Unfinished rows only (the partial index ``entries_unfinished``), and the succeeded ones as
# the tally plus the successes not folded into it yet: the cost follows the backlog and the
# recent throughput, never the history.
_COUNTS = sql.SQL(
    """
    SELECT
        count(*) FILTER (WHERE e.state = 'queued'),
        count(*) FILTER (WHERE e.state = 'running'),
        count(*) FILTER (WHERE e.state = 'retry_wait'),
        coalesce((SELECT t.succeeded FROM {tallies} t WHERE t.policy_key = %(policy_key)s), 0)
            + (SELECT count(*) FROM {entries} u
               WHERE u.policy_key = %(policy_key)s AND u.state = 'succeeded' AND NOT u.counted),
        count(*) FILTER (WHERE e.state = 'dead'),
        EXTRACT(EPOCH FROM {next_due} - now())
    FROM {entries} e WHERE e.policy_key = %(policy_key)s AND e.state <> 'succeeded'
    """
).format(entries=_ENTRIES, tallies=_TALLIES, next_due=_NEXT_DUE)


def counts(conn: psycopg.Connection[Any], *, policy_key: str) -> LedgerCounts:
    """Per-state counts for ProcessingStatus (``pending`` comes from the source)."""
    row = conn.execute(_COUNTS, {"policy_key": policy_key}).fetchone()
    assert row is not None
    return _counts(row)


def _counts(row: Sequence[Any]) -> LedgerCounts:
    return LedgerCounts(
        queued=row[0],
        running=row[1],
        retrying=row[2],
        succeeded=row[3],
        dead=row[4],
        seconds_until_next_due=None if row[5] is None else float(row[5]),
    )


@dataclasses.dataclass(frozen=True)
class Consumption:
    """Whether workers take this policy's work: ``planning.workers_not_consuming``."""

    oldest_queued_seconds: float | None  # None: nothing published and waiting
    last_finished_seconds_ago: float | None  # None: no attempt ever finished
    # The longest heartbeat timeout of the live worker processes running its entries: the
    # ledger holds their attempts that long whatever the lease (``conditions.lease_fits_workers``).
    # None: nothing runs under an incarnation now.
    workers_heartbeat_timeout_seconds: float | None = None


# Each part uses an index: entries_unfinished (policy_key, state), attempts_finished
# (policy_key, finished_at) and the incarnations' primary key, so the check costs the
# backlog, not the history.
_CONSUMPTION = sql.SQL(
    """
    SELECT
        (SELECT EXTRACT(EPOCH FROM now() - min(dispatched_at)) FROM {entries}
         WHERE policy_key = %(policy_key)s AND state = 'queued' AND lease_deadline > now()),
        (SELECT EXTRACT(EPOCH FROM now() - max(finished_at)) FROM {attempts}
         WHERE policy_key = %(policy_key)s AND finished_at IS NOT NULL),
        (SELECT max(i.heartbeat_timeout_seconds) FROM {incarnations} i
         WHERE i.ended_at IS NULL AND i.id IN (
            SELECT r.incarnation FROM {entries} r
            WHERE r.policy_key = %(policy_key)s AND r.state = 'running'))
    """
).format(entries=_ENTRIES, attempts=_ATTEMPTS, incarnations=_INCARNATIONS)


def _consumption(row: Sequence[Any]) -> Consumption:
    return Consumption(
        oldest_queued_seconds=None if row[0] is None else float(row[0]),
        last_finished_seconds_ago=None if row[1] is None else float(row[1]),
        workers_heartbeat_timeout_seconds=None if row[2] is None else float(row[2]),
    )


FOLD_BATCH = 50_000
PRUNE_BATCH = 10_000

_FOLD_SUCCESSES = sql.SQL(
    """
    WITH folded AS (
        UPDATE {entries} SET counted = true
        WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {entries}
            WHERE policy_key = %(policy_key)s AND state = 'succeeded' AND NOT counted
            LIMIT %(limit)s))
          AND state = 'succeeded' AND NOT counted
        RETURNING 1
    )
    INSERT INTO {tallies} AS t (policy_key, succeeded)
    SELECT %(policy_key)s, count(*) FROM folded
    ON CONFLICT (policy_key) DO UPDATE SET succeeded = t.succeeded + EXCLUDED.succeeded
    RETURNING (SELECT count(*) FROM folded)
    """
).format(entries=_ENTRIES, tallies=_TALLIES)


def fold_successes(
    conn: psycopg.Connection[Any], *, policy_key: str, limit: int = FOLD_BATCH
) -> int:
    """Add successes not yet counted to the policy's tally (at most ``limit``); how many.

    A row's ``counted`` flag and the tally change in one statement, so each success is
    counted exactly once, whenever its transaction committed — no time watermark to race.
    """
    row = conn.execute(_FOLD_SUCCESSES, {"policy_key": policy_key, "limit": limit}).fetchone()
    return 0 if row is None else int(row[0])


# Oldest first, a bounded batch per sweep, each through its index: retention costs what it
# deletes, however large the history. Only counted successes go: the tally keeps them.
_PRUNE_ATTEMPTS = sql.SQL(
    """
    DELETE FROM {attempts} WHERE id = ANY(ARRAY(
        SELECT id FROM {attempts}
        WHERE policy_key = %(policy_key)s AND finished_at IS NOT NULL
          AND finished_at < now() - make_interval(secs => %(retention)s)
        ORDER BY finished_at LIMIT %(limit)s))
    """
).format(attempts=_ATTEMPTS)
_PRUNE_SUCCEEDED = sql.SQL(
    """
    DELETE FROM {entries} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {entries}
        WHERE policy_key = %(policy_key)s AND state = 'succeeded' AND counted
          AND finished_at < now() - make_interval(secs => %(retention)s)
        ORDER BY finished_at LIMIT %(limit)s))
      AND state = 'succeeded' AND counted
    """
).format(entries=_ENTRIES)


@dataclasses.dataclass(frozen=True)
class Pruned:
    attempts: int
    entries: int


def prune(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    retention_seconds: float,
    limit: int = PRUNE_BATCH,
) -> Pruned:
    """Delete up to ``limit`` attempts and ``limit`` succeeded entries that finished more than
    ``retention_seconds`` ago. Dropping a succeeded row loses nothing: an entry the source
    shows pending again is simply claimed anew."""
    params = {"policy_key": policy_key, "retention": retention_seconds, "limit": limit}
    attempts = conn.execute(_PRUNE_ATTEMPTS, params).rowcount
    entries = conn.execute(_PRUNE_SUCCEEDED, params).rowcount
    return Pruned(attempts=attempts, entries=entries)


# --- what a sweep has to do ------------------------------------------------------------
#
# Most sweeps of most policies find nothing to do: no attempt running, nothing lost, nothing
# to settle, fold or prune. Asking each step's own statement to find that out cost a sweep
# about fifteen round trips; ``survey`` asks all of it in one, each part through the index
# its step would use, and the sweep runs only the steps it names (``planning.sweep_chores``).
# The same statement publishes the policy's rules (``upsert_policy``), as every sweep did.
# What it reads may change right after (a worker finishes, a retry falls due): a step it
# skipped then runs at the next sweep, which the loop schedules by ``seconds_until_next_due``
# as before — the survey is a snapshot, as each step's own statement was.


def _rendered(statement: sql.Composed) -> bytes:
    """A statement's text, composed once. psycopg renders a ``Composed`` afresh at every
    execution, walking its tree of text and identifiers; for the statements every sweep of
    every policy runs, that cost more CPU than the rest of the statement's handling. Our
    statements hold only our schema's ASCII names and placeholders, so their text is the
    same on every connection."""
    return statement.as_bytes(None)


_SURVEY = _rendered(
    sql.SQL(
        """
    WITH rules AS ({upsert})
    SELECT
        count(*) FILTER (WHERE e.state = 'running'),
        count(*) FILTER (WHERE e.state = 'queued' AND e.lease_deadline <= now()),
        count(*) FILTER (WHERE e.state IN ('retry_wait', 'dead')),
        count(*) FILTER (WHERE e.state = 'retry_wait' AND e.next_attempt_at <= now()),
        count(*) FILTER (WHERE e.state IN ('queued', 'running') AND e.lease_deadline > now()),
        count(*) FILTER (WHERE e.state = 'queued' AND e.lease_deadline > now()
            AND e.dispatched_at < now() - make_interval(secs => %(stranded_seconds)s)),
        EXTRACT(EPOCH FROM {next_due} - now()),
        EXISTS (SELECT 1 FROM {entries} u
                WHERE u.policy_key = %(policy_key)s AND u.state = 'succeeded' AND NOT u.counted),
        EXISTS (SELECT 1 FROM {attempts} a
                WHERE a.policy_key = %(policy_key)s AND a.finished_at IS NOT NULL
                  AND a.finished_at < now() - make_interval(secs => %(retention)s))
            OR EXISTS (SELECT 1 FROM {entries} s
                WHERE s.policy_key = %(policy_key)s AND s.state = 'succeeded' AND s.counted
                  AND s.finished_at < now() - make_interval(secs => %(retention)s)),
        EXISTS (SELECT 1 FROM {incarnations} i WHERE i.ended_at IS NULL AND i.pod_uid IS NULL
                  AND i.heartbeat_at < now() - make_interval(secs => i.heartbeat_timeout_seconds)),
        EXISTS (SELECT 1 FROM {incarnations} i WHERE i.ended_at < now() - interval '1 day')
    FROM {entries} e WHERE e.policy_key = %(policy_key)s AND e.state <> 'succeeded'
    """
    ).format(
        upsert=_UPSERT_POLICY,
        next_due=_NEXT_DUE,
        entries=_ENTRIES,
        attempts=_ATTEMPTS,
        incarnations=_INCARNATIONS,
    )
)


@dataclasses.dataclass(frozen=True)
class Survey:
    """What the ledger holds that a sweep of one policy may have to act on."""

    running: int  # attempts running (lost ones among them, if any)
    unstarted: int  # queued, lease run out: the message was lost (claimed again as it is)
    unsettled: int  # retry_wait or dead: the table may show them processed
    due_retries: int
    in_flight: int  # queued or running under a live lease
    queued_a_while: int  # queued longer than ``stranded_seconds``: is the message still there?
    seconds_until_next_due: float | None
    unfolded: bool  # successes not in the tally yet
    history_expired: bool  # attempts or succeeded entries past retention
    silent_incarnations: (
        bool  # of any policy, outside Kubernetes: a heartbeat older than its timeout
    )
    incarnations_expired: bool  # of any policy: ended more than a day ago


def survey(
    conn: psycopg.Connection[Any], policy: policy_module.Policy, *, stranded_seconds: float
) -> Survey:
    """Publish the policy's rules (as ``upsert_policy``) and read what its sweep has to do."""
    row = conn.execute(
        _SURVEY,
        {
            **_rules(policy),
            "stranded_seconds": stranded_seconds,
            "retention": policy.history.retention_seconds,
        },
    ).fetchone()
    assert row is not None
    return Survey(
        running=row[0],
        unstarted=row[1],
        unsettled=row[2],
        due_retries=row[3],
        in_flight=row[4],
        queued_a_while=row[5],
        seconds_until_next_due=None if row[6] is None else float(row[6]),
        unfolded=row[7],
        history_expired=row[8],
        silent_incarnations=row[9],
        incarnations_expired=row[10],
    )


_ENTRY = sql.SQL(
    """
    SELECT policy_key, entry_id, state, attempt, fence_token, lease_deadline, next_attempt_at,
        worker, last_error, created_at, updated_at
    FROM {entries} WHERE policy_key = %s AND entry_id = %s
    """
).format(entries=_ENTRIES)
# Ended attempts, then the running one, which has no history row yet (``_attempt_ended``).
_ATTEMPT_HISTORY = sql.SQL(
    """
    SELECT attempt, fence_token, worker, outcome, error, dispatched_at, started_at,
        finished_at, retry_at
    FROM (
        SELECT id, attempt, fence_token, worker, outcome, error, dispatched_at, started_at,
            finished_at, retry_at
        FROM {attempts} WHERE policy_key = %(policy_key)s AND entry_id = %(entry_id)s
        UNION ALL
        SELECT NULL, e.attempt, e.fence_token, e.worker, 'running', NULL, e.dispatched_at,
            e.started_at, NULL, NULL
        FROM {entries} e
        WHERE e.policy_key = %(policy_key)s AND e.entry_id = %(entry_id)s
          AND e.state = 'running'
          AND NOT EXISTS (SELECT 1 FROM {attempts} a
                          WHERE a.fence_token = e.fence_token AND a.outcome = 'running')
    ) AS attempts
    ORDER BY id NULLS LAST
    """
).format(attempts=_ATTEMPTS, entries=_ENTRIES)


def history(
    conn: psycopg.Connection[Any], *, policy_key: str, entry_id: str
) -> EntryHistory | None:
    """The ledger row of one entry and every attempt it had (for ``explain``)."""
    with conn.cursor(row_factory=dict_row) as cursor:
        entry = cursor.execute(_ENTRY, [policy_key, entry_id]).fetchone()
        if entry is None:
            return None
        attempts = cursor.execute(
            _ATTEMPT_HISTORY, {"policy_key": policy_key, "entry_id": entry_id}
        ).fetchall()
    return EntryHistory(**entry, attempts=tuple(AttemptRecord(**attempt) for attempt in attempts))


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """Attempts that finished in a time window, by what became of their entry."""

    succeeded: int
    retried: int  # failed or lost, with another attempt scheduled
    dead_lettered: int  # failed or lost with no attempts left
    until: datetime.datetime  # the window's end: pass it as ``since`` next time


# A window ends a few seconds in the past: an attempt's finished_at is its transaction's
# start, so one committing right now may carry a time just before the window's end.
OUTCOME_SETTLE_SECONDS = 5.0

_OUTCOMES = sql.SQL(
    """
    WITH window_end AS (SELECT now() - make_interval(secs => %(settle)s) AS until)
    SELECT window_end.until,
        count(*) FILTER (WHERE outcome = 'succeeded'),
        count(*) FILTER (WHERE outcome IN ('failed', 'lost') AND retry_at IS NOT NULL),
        count(*) FILTER (WHERE outcome IN ('failed', 'lost') AND retry_at IS NULL)
    FROM window_end LEFT JOIN {attempts} a
      ON a.policy_key = %(policy_key)s
     AND a.finished_at > coalesce(%(since)s::timestamptz, window_end.until)
     AND a.finished_at <= window_end.until
    GROUP BY window_end.until
    """
).format(attempts=_ATTEMPTS)


def _outcomes(row: Sequence[Any]) -> Outcomes:
    return Outcomes(until=row[0], succeeded=row[1], retried=row[2], dead_lettered=row[3])


@dataclasses.dataclass(frozen=True)
class Status:
    counts: LedgerCounts
    consumption: Consumption
    outcomes: Outcomes


# The status read after every sweep and at every refresh: three reads of one policy's rows
# through their own indexes, in one round trip.
_STATUS = _rendered(
    sql.SQL(
        "SELECT * FROM ({counts}) AS counts, ({consumption}) AS consumption, "
        "({outcomes}) AS outcomes"
    ).format(counts=_COUNTS, consumption=_CONSUMPTION, outcomes=_OUTCOMES)
)


def status(
    conn: psycopg.Connection[Any], *, policy_key: str, outcomes_since: datetime.datetime | None
) -> Status:
    """``counts``, ``consumption`` and ``outcomes_since`` of one policy, in one statement.

    Without ``outcomes_since`` (an operator's first read) the window of outcomes is empty
    and only opens: it reads the tally and the unfinished rows, never the history, so a
    start over millions of finished attempts costs what a start over none does. The
    counters it feeds are Prometheus counters, which start at zero with their process."""
    row = conn.execute(
        _STATUS,
        {"policy_key": policy_key, "since": outcomes_since, "settle": OUTCOME_SETTLE_SECONDS},
    ).fetchone()
    assert row is not None
    return Status(
        counts=_counts(row[:6]),
        consumption=_consumption(row[6:9]),
        outcomes=_outcomes(row[9:]),
    )
