"""The owner of each policy and its sweeps.

A replica sweeps a policy only while it holds the policy's Lease (``sharding``); the ledger
makes that binding where it matters, on the writes. ``begin_sweep`` takes the policy's
owner row if the sweeper's fencing token is accepted (``sharding.fence_accepts``: the
compare-and-set below) and opens the sweep's interval; every claim transaction re-checks
the row under a share lock (``check_fence``), and ``end_sweep`` closes the interval under
the same check. A takeover must lock the row, so it waits for a claim transaction of the
previous owner to commit, and closes that owner's open interval at its own clock time:
after it, the previous owner can commit nothing, and intervals of two owners never
overlap — which ``sweeps`` shows. Steps of a sweep that are idempotent and already run
concurrently with rescues (expiry, settling, counting) are not fenced: the fence guards
what must happen once, claiming and dispatching.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler import sharding
from celery_reconciler.ledger import shared
from celery_reconciler_worker import ledger as worker_ledger


class FencedOut(RuntimeError):
    """Another replica owns the policy now (a newer fencing token in ``policy_owners``): this
    one's sweep was refused and must stop. ``current`` is the owner the ledger knows."""

    def __init__(self, message: str, *, current: sharding.Fence | None) -> None:
        super().__init__(message)
        self.current = current


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
).format(owners=shared.OWNERS)
_CURRENT_OWNER = sql.SQL(
    "SELECT holder, token FROM {owners} WHERE policy_key = %(policy_key)s"
).format(owners=shared.OWNERS)
_CHECK_OWNER = sql.SQL(
    "SELECT 1 FROM {owners} WHERE policy_key = %(policy_key)s AND holder = %(holder)s "
    "AND token = %(token)s FOR SHARE"
).format(owners=shared.OWNERS)
_CLOSE_PREDECESSORS = sql.SQL(
    """
    UPDATE {sweeps} SET finished_at = clock_timestamp(), ended = 'taken_over'
    WHERE policy_key = %(policy_key)s AND finished_at IS NULL
      AND (holder, token) IS DISTINCT FROM (%(holder)s, %(token)s::bigint)
    """
).format(sweeps=shared.SWEEPS)
_OPEN_SWEEP = sql.SQL(
    "INSERT INTO {sweeps} (policy_key, holder, token) VALUES (%(policy_key)s, %(holder)s, "
    "%(token)s) RETURNING id"
).format(sweeps=shared.SWEEPS)
_CLOSE_SWEEP = sql.SQL(
    "UPDATE {sweeps} SET finished_at = clock_timestamp(), ended = %(ended)s "
    "WHERE id = %(id)s AND finished_at IS NULL"
).format(sweeps=shared.SWEEPS)
_PRUNE_SWEEPS = sql.SQL(
    """
    DELETE FROM {sweeps} WHERE id IN (
        SELECT id FROM {sweeps} WHERE policy_key = %(policy_key)s
          AND started_at < now() - make_interval(secs => %(seconds)s)
        ORDER BY started_at LIMIT 1000)
    """
).format(sweeps=shared.SWEEPS)


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
).format(owners=shared.OWNERS, work=worker_ledger.POLICY_WORK)


def forget_owner(conn: psycopg.Connection[Any], *, policy_key: str, policy_uid: str) -> None:
    """Remove the owner row of a policy that no longer exists (that uid of that name)."""
    conn.execute(_FORGET_OWNER, {"policy_key": policy_key, "policy_uid": policy_uid})


def _fence_params(fence: sharding.Fence) -> dict[str, Any]:
    return {"policy_key": fence.policy_key, "holder": fence.holder, "token": fence.token}


def fenced_out(conn: psycopg.Connection[Any], fence: sharding.Fence) -> FencedOut:
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
            raise fenced_out(conn, fence)
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
        raise fenced_out(conn, fence)


def end_sweep(
    conn: psycopg.Connection[Any], fence: sharding.Fence, *, sweep_id: int, finished: bool
) -> None:
    """Close the interval, if this replica still owns the policy (else a takeover closed it)."""
    with conn.transaction():
        if conn.execute(_CHECK_OWNER, _fence_params(fence)).fetchone() is None:
            return
        conn.execute(_CLOSE_SWEEP, {"id": sweep_id, "ended": "finished" if finished else "failed"})
