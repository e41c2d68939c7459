"""The database arbitrates overlapping policies: each records the work it holds in the ledger.

Two policies that would process the same rows must not both dispatch them. Comparing
Kubernetes objects cannot tell: policies in different namespaces, or naming different
Secrets, or one database through two DSN spellings, all look unrelated there. The database
they process knows: the ledger of that database (``celery_reconciler.policy_work``) holds one
row per policy that sweeps it — the table by OID, the pending predicate, the task, and the
policy's creation time and uid — and at every sweep a policy records its row and reads the
rows of every other policy on the same table, in the same statement. ``planning
.work_yields_to`` then decides, the same way in every operator that shares the database.

A row outlives its policy only if the operator never saw the deletion (its finalizer was
removed by hand); the policy that yields to such a row checks that its holder still exists
(``loop``) and removes the row of one that does not (``forget``, matched by uid, so a
recreated policy of the same name keeps its own).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler import planning
from celery_reconciler import policy as policy_module
from celery_reconciler_worker import ledger as worker_ledger

_WORK = worker_ledger.POLICY_WORK

_RECORD_AND_READ = sql.SQL(
    """
    WITH target AS (SELECT to_regclass(%(table)s)::oid AS oid),
    recorded AS (
        INSERT INTO {work} AS w (policy_key, policy_uid, created, table_oid, table_name,
            pending, task_name)
        SELECT %(policy_key)s, %(policy_uid)s, %(created)s, target.oid, %(table)s,
            %(pending)s, %(task_name)s
        FROM target
        ON CONFLICT (policy_key) DO UPDATE SET
            policy_uid = EXCLUDED.policy_uid, created = EXCLUDED.created,
            table_oid = EXCLUDED.table_oid, table_name = EXCLUDED.table_name,
            pending = EXCLUDED.pending, task_name = EXCLUDED.task_name, updated_at = now()
        WHERE (w.policy_uid, w.created, w.table_oid, w.table_name, w.pending, w.task_name)
            IS DISTINCT FROM (EXCLUDED.policy_uid, EXCLUDED.created, EXCLUDED.table_oid,
                              EXCLUDED.table_name, EXCLUDED.pending, EXCLUDED.task_name)
        RETURNING 1
    )
    SELECT o.policy_key, o.policy_uid, o.created, o.pending, o.task_name
    FROM {work} o, target
    WHERE o.table_oid = target.oid AND o.policy_key <> %(policy_key)s
    """
).format(work=_WORK)

_FORGET = sql.SQL("DELETE FROM {work} WHERE policy_key = %s AND policy_uid = %s").format(work=_WORK)


def held_by(policy: policy_module.Policy, *, uid: str, created: str) -> planning.WorkHeld:
    return planning.WorkHeld(
        policy_key=policy.key,
        policy_uid=uid,
        created=created,
        pending=planning.pending_text(policy.source.pending),
        task_name=policy.task.name,
    )


def record_and_read(
    conn: psycopg.Connection[Any], policy: policy_module.Policy, *, mine: planning.WorkHeld
) -> list[planning.WorkHeld]:
    """Record the work ``policy`` holds (a no-op write when unchanged) and return what every
    other policy holds on the same table of this database (none when the table is
    missing: then the sweep fails on its own, naming the table)."""
    table = policy.source.table
    parts = (table.schema, table.table) if table.schema else (table.table,)
    rows = conn.execute(
        _RECORD_AND_READ,
        {
            # to_regclass() parses the quoted name as the source's queries do, search_path
            # included; it is a value here, never part of the statement's text.
            "table": sql.Identifier(*parts).as_string(conn),
            "policy_key": mine.policy_key,
            "policy_uid": mine.policy_uid,
            "created": mine.created,
            "pending": mine.pending,
            "task_name": mine.task_name,
        },
    ).fetchall()
    return [planning.WorkHeld(*row) for row in rows]


def forget(conn: psycopg.Connection[Any], *, policy_key: str, policy_uid: str) -> None:
    """Remove the record of a policy that no longer exists (that uid of that name)."""
    conn.execute(_FORGET, [policy_key, policy_uid])
