"""What ``ProcessingStatus`` and ``explain`` show: counts, the tally of successes,
consumption, outcomes, the next due time, one entry's history.

Successes are folded into a per-policy tally (``fold_successes``: each exactly once), so a
count costs the backlog and the recent throughput, never the history; ``status`` reads the
counts, consumption and outcomes of one policy in one round trip.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from celery_reconciler.ledger import shared


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


_COUNT_IN_FLIGHT = sql.SQL(
    "SELECT count(*) FROM {entries} WHERE policy_key = %s AND state IN ('queued', 'running') "
    "AND lease_deadline > now()"
).format(entries=shared.ENTRIES)


def count_in_flight(conn: psycopg.Connection[Any], *, policy_key: str) -> int:
    """Entries dispatched or running under a live lease (what ``maxInFlight`` limits)."""
    row = conn.execute(_COUNT_IN_FLIGHT, [policy_key]).fetchone()
    assert row is not None
    return int(row[0])


_SECONDS_UNTIL_NEXT_DUE = sql.SQL(
    """
    SELECT EXTRACT(EPOCH FROM {next_due} - now())
    FROM {entries} e
    WHERE e.policy_key = %s AND e.state IN ('queued', 'running', 'retry_wait')
    """
).format(entries=shared.ENTRIES, next_due=shared.NEXT_DUE)


def seconds_until_next_due(conn: psycopg.Connection[Any], *, policy_key: str) -> float | None:
    """Time until the earliest retry falls due or lease runs out (None: nothing scheduled)."""
    row = conn.execute(_SECONDS_UNTIL_NEXT_DUE, [policy_key]).fetchone()
    return None if row is None or row[0] is None else float(row[0])


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
).format(entries=shared.ENTRIES, tallies=shared.TALLIES, next_due=shared.NEXT_DUE)


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
).format(entries=shared.ENTRIES, attempts=shared.ATTEMPTS, incarnations=shared.INCARNATIONS)


def _consumption(row: Sequence[Any]) -> Consumption:
    return Consumption(
        oldest_queued_seconds=None if row[0] is None else float(row[0]),
        last_finished_seconds_ago=None if row[1] is None else float(row[1]),
        workers_heartbeat_timeout_seconds=None if row[2] is None else float(row[2]),
    )


FOLD_BATCH = 50_000


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
).format(entries=shared.ENTRIES, tallies=shared.TALLIES)


def fold_successes(
    conn: psycopg.Connection[Any], *, policy_key: str, limit: int = FOLD_BATCH
) -> int:
    """Add successes not yet counted to the policy's tally (at most ``limit``); how many.

    A row's ``counted`` flag and the tally change in one statement, so each success is
    counted exactly once, whenever its transaction committed — no time watermark to race.
    """
    row = conn.execute(_FOLD_SUCCESSES, {"policy_key": policy_key, "limit": limit}).fetchone()
    return 0 if row is None else int(row[0])


_ENTRY = sql.SQL(
    """
    SELECT policy_key, entry_id, state, attempt, fence_token, lease_deadline, next_attempt_at,
        worker, last_error, created_at, updated_at
    FROM {entries} WHERE policy_key = %s AND entry_id = %s
    """
).format(entries=shared.ENTRIES)
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
).format(attempts=shared.ATTEMPTS, entries=shared.ENTRIES)


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
).format(attempts=shared.ATTEMPTS)


def _outcomes(row: Sequence[Any]) -> Outcomes:
    return Outcomes(until=row[0], succeeded=row[1], retried=row[2], dead_lettered=row[3])


@dataclasses.dataclass(frozen=True)
class Status:
    counts: LedgerCounts
    consumption: Consumption
    outcomes: Outcomes


# The status read after every sweep and at every refresh: three reads of one policy's rows
# through their own indexes, in one round trip.
_STATUS = shared.rendered(
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
