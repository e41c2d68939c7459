"""What becomes of an attempt that did not simply succeed: lost attempts expired, finished
entries settled, retries due or revived.

A lost running attempt is a failed attempt (``expire_leases``: its incarnation ended, or
its lease ran out); a ``retry_wait`` or ``dead`` row whose entry the source shows processed
is settled as succeeded (``settle_finished``); due retries are dispatched ahead of the
backlog (``due_retries``); dead entries get a fresh set of attempts only on request
(``retry_dead``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler.ledger import shared
from celery_reconciler_worker import ledger as worker_ledger


@dataclasses.dataclass(frozen=True)
class ExpiredLeases:
    retry_now: int  # running attempts lost, entry pending again (counts as a failed attempt)
    dead: int  # running attempts lost with no attempts left
    unstarted: int  # queued messages never started before the lease ran out (lost messages)
    retry_ids: tuple[str, ...] = ()  # the entries of ``retry_now``, due again now


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
    entries=shared.ENTRIES,
    policies=shared.POLICIES,
    incarnations=shared.INCARNATIONS,
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
).format(entries=shared.ENTRIES)


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


_UNSETTLED = sql.SQL(
    """
    SELECT entry_id FROM {entries}
    WHERE policy_key = %s AND state IN ('retry_wait', 'dead')
    ORDER BY updated_at LIMIT %s
    """
).format(entries=shared.ENTRIES)

_MARK_SETTLED = sql.SQL(
    """
    UPDATE {entries} SET state = 'succeeded', next_attempt_at = NULL, updated_at = now(),
        finished_at = coalesce(finished_at, now())
    WHERE policy_key = %s AND entry_id = ANY(%s) AND state IN ('retry_wait', 'dead')
    """
).format(entries=shared.ENTRIES)


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
).format(entries=shared.ENTRIES)


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
).format(entries=shared.ENTRIES)


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
