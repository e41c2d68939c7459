"""Ending worker incarnations: the silent ones no one else can vouch for, and exactly the
ones a pod event proves dead.

Liveness is a fact about an incarnation, never about a name. A process without a pod
identity that stopped heartbeating has stopped its own bodies, or is dead
(``end_silent_incarnations``); one that names a Pod is judged by its Pod
(``silent_pod_incarnations``, ``end_pod_incarnations``), never by its silence. The running
attempts of an ended incarnation then expire (``expiry.expire_leases``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler import planning
from celery_reconciler.ledger import shared

_END_SILENT_INCARNATIONS = sql.SQL(
    """
    UPDATE {incarnations} SET ended_at = now(),
        ended_reason = 'no heartbeat for ' || round(heartbeat_timeout_seconds::numeric, 1)
            || ' s: it stopped its own bodies'
    WHERE ended_at IS NULL AND pod_uid IS NULL
      AND heartbeat_at < now() - make_interval(secs => heartbeat_timeout_seconds)
    """
).format(incarnations=shared.INCARNATIONS)
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
).format(incarnations=shared.INCARNATIONS, entries=shared.ENTRIES)


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


_LIVE_POD_INCARNATIONS = sql.SQL(
    """
    SELECT id, container_id, container_name, container_started_at, started_at
    FROM {incarnations} WHERE ended_at IS NULL AND pod_uid = %s
    """
).format(incarnations=shared.INCARNATIONS)
_END_INCARNATIONS = sql.SQL(
    """
    UPDATE {incarnations} i SET ended_at = now(), ended_reason = ended.reason
    FROM unnest(%(ids)s::uuid[], %(reasons)s::text[]) AS ended(id, reason)
    WHERE i.id = ended.id AND i.ended_at IS NULL
    """
).format(incarnations=shared.INCARNATIONS)


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
