"""A Celery app for the sharding test: one table and one task per policy, so that a dozen
policies share one database, one queue and one worker without overlapping (the operator
refuses two policies with the same table and task).

``shard_NN(id, done)`` holds the entries of policy ``shard-NN``; task ``shard.process_NN``
marks one done through the fenced commit and records its run in ``shard_runs``, committed
before the work, so a body that ran twice shows.
"""

from __future__ import annotations

import os
from typing import Any

import celery
import psycopg
from psycopg import sql

from celery_reconciler_worker import reliable

POLICIES = 12
QUEUE = "shards"


def table_name(index: int) -> str:
    return f"shard_{index:02d}"


def task_name(index: int) -> str:
    return f"shard.process_{index:02d}"


def create_tables(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(
            "CREATE TABLE shard_runs (id bigserial PRIMARY KEY, table_name text NOT NULL, "
            "entry_id bigint NOT NULL, task_id text NOT NULL, "
            "started_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        for index in range(1, POLICIES + 1):
            table = sql.Identifier(table_name(index))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id bigserial PRIMARY KEY, "
                    "done boolean NOT NULL DEFAULT false)"
                ).format(table)
            )
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {} (id) WHERE NOT done").format(
                    sql.Identifier(f"{table_name(index)}_pending"), table
                )
            )


def add_entries(conn: psycopg.Connection[Any], *, per_table: int) -> None:
    with conn.transaction():
        for index in range(1, POLICIES + 1):
            conn.execute(
                sql.SQL("INSERT INTO {} (done) SELECT false FROM generate_series(1, %s)").format(
                    sql.Identifier(table_name(index))
                ),
                [per_table],
            )


app = celery.Celery("shards", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(reliable.recommended_settings(lease_seconds=60))
app.conf.task_default_queue = QUEUE
app.conf.task_ignore_result = True

_connection: dict[int, psycopg.Connection[Any]] = {}


def _conn() -> psycopg.Connection[Any]:
    # One connection per worker process, opened after the prefork pool forked.
    conn = _connection.get(os.getpid())
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ[reliable.DSN_ENVIRONMENT_VARIABLE], autocommit=True)
        _connection[os.getpid()] = conn
    return conn


def _register(index: int) -> None:
    table = table_name(index)

    def process(self: Any, entry_id: str) -> None:
        conn = _conn()
        conn.execute(
            "INSERT INTO shard_runs (table_name, entry_id, task_id) VALUES (%s, %s, %s)",
            [table, int(entry_id), str(self.request.id)],
        )
        with reliable.fenced_transaction(conn):
            conn.execute(
                sql.SQL("UPDATE {} SET done = true WHERE id = %s").format(sql.Identifier(table)),
                [int(entry_id)],
            )

    app.task(bind=True, base=reliable.ReconciledTask, name=task_name(index))(process)


for _index in range(1, POLICIES + 1):
    _register(_index)
