"""How long the ledger keeps what is finished: attempts and counted successes past the
policy's retention, incarnations that ended a day ago. Oldest first, a bounded batch per
sweep, each through its index: retention costs what it deletes, however large the history.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler.ledger import shared

# Ended incarnations are kept a day for ``explain`` and people, then pruned in batches.
_PRUNE_ENDED_INCARNATIONS = sql.SQL(
    """
    DELETE FROM {incarnations} WHERE id IN (
        SELECT id FROM {incarnations} WHERE ended_at < now() - interval '1 day' LIMIT 1000)
    """
).format(incarnations=shared.INCARNATIONS)


def prune_ended_incarnations(conn: psycopg.Connection[Any]) -> int:
    """Delete up to 1000 incarnations that ended more than a day ago; how many."""
    return conn.execute(_PRUNE_ENDED_INCARNATIONS).rowcount


PRUNE_BATCH = 10_000


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
).format(attempts=shared.ATTEMPTS)
_PRUNE_SUCCEEDED = sql.SQL(
    """
    DELETE FROM {entries} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {entries}
        WHERE policy_key = %(policy_key)s AND state = 'succeeded' AND counted
          AND finished_at < now() - make_interval(secs => %(retention)s)
        ORDER BY finished_at LIMIT %(limit)s))
      AND state = 'succeeded' AND counted
    """
).format(entries=shared.ENTRIES)


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
