"""Many policies on one database: their tables, their manifests, and a worker that serves all.

The many-policies e2e test and ``benchmarks/policies.py`` apply hundreds of ProcessingPolicies
to one operator. Each policy needs rows of its own — otherwise the operator rightly reports
all but the oldest as ``Conflict`` — so policy ``i`` reads table ``scale_<i>`` (``id``,
``done``, a partial index on the pending rows) and sends task ``scale.mark_<i>``, which
marks that row done inside ``reliable.fenced_transaction``, as a user's task would. One
Celery worker (``-A devstack.scale_app``) registers the first ``SCALE_TABLES`` such tasks
(default 1000) and consumes queue ``scale``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import celery
import psycopg
from psycopg import sql

from celery_reconciler_worker import reliable

QUEUE = "scale"
TASK_PREFIX = "scale.mark_"
LABELS = {"app": "scale-worker"}

app = celery.Celery("scale", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(reliable.recommended_settings())
app.conf.task_default_queue = QUEUE
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False


def table_name(index: int) -> str:
    return f"scale_{index}"


class _Connection:
    """One autocommit connection per worker process, opened after the pool forks."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.connection: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self.connection is None or self.connection.closed or self.pid != os.getpid():
            self.connection = psycopg.connect(
                os.environ[reliable.DSN_ENVIRONMENT_VARIABLE], autocommit=True
            )
            self.pid = os.getpid()
        return self.connection


_connection = _Connection()


def _register(index: int) -> None:
    update = sql.SQL("UPDATE {} SET done = true WHERE id = %s").format(
        sql.Identifier(table_name(index))
    )

    def mark(self: reliable.ReconciledTask, entry_id: str) -> None:
        conn = _connection.get()
        with reliable.fenced_transaction(conn):
            conn.execute(update, [int(entry_id)])

    app.task(bind=True, base=reliable.ReconciledTask, name=f"{TASK_PREFIX}{index}")(mark)


for _index in range(int(os.environ.get("SCALE_TABLES", "1000"))):
    _register(_index)


def create_tables(dsn: str, *, count: int, rows_each: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for index in range(count):
            table = sql.Identifier(table_name(index))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {table} (id bigserial PRIMARY KEY, done boolean NOT NULL "
                    "DEFAULT false)"
                ).format(table=table)
            )
            conn.execute(sql.SQL("CREATE INDEX ON {table} (id) WHERE NOT done").format(table=table))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {table} (done) SELECT false FROM generate_series(1, %s)"
                ).format(table=table),
                [rows_each],
            )


def pending_tables(dsn: str, *, count: int) -> list[int]:
    """The tables that still have a row not done (one query for all)."""
    union = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {index} FROM {table} WHERE NOT done").format(
            index=sql.Literal(index), table=sql.Identifier(table_name(index))
        )
        for index in range(count)
    )
    with psycopg.connect(dsn) as conn:
        return sorted({int(row[0]) for row in conn.execute(union).fetchall()})


def processed_rows(dsn: str, *, count: int) -> int:
    union = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT count(*) FROM {table} WHERE done").format(
            table=sql.Identifier(table_name(index))
        )
        for index in range(count)
    )
    with psycopg.connect(dsn) as conn:
        return sum(int(row[0]) for row in conn.execute(union).fetchall())


def policies_manifest(*, count: int, sweep_interval: str = "30s") -> str:
    """``count`` policies named ``scale-<i>``, all naming the Secrets ``demo-db`` and
    ``demo-broker`` and the same worker pods."""
    items = [
        {
            "apiVersion": "celery-reconciler.io/v1alpha1",
            "kind": "ProcessingPolicy",
            "metadata": {"name": f"scale-{index}"},
            "spec": {
                "source": {
                    "databaseSecretRef": {"name": "demo-db", "key": "dsn"},
                    "table": f"public.{table_name(index)}",
                    "idColumn": "id",
                    "pending": {"column": "done", "equals": False},
                    "orderBy": "id",
                },
                "task": {
                    "name": f"{TASK_PREFIX}{index}",
                    "brokerSecretRef": {"name": "demo-broker", "key": "url"},
                    "queue": QUEUE,
                },
                "schedule": {"sweepInterval": sweep_interval},
                "lease": {"timeout": "10m"},
                "workers": {"podSelector": {"matchLabels": LABELS}},
            },
        }
        for index in range(count)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def not_ready(items: list[dict[str, Any]]) -> list[str]:
    """Names of the policies (from ``kubectl get -o json``) whose Ready is not True."""
    waiting = []
    for item in items:
        found = {
            c.get("type"): c.get("status") for c in (item.get("status") or {}).get("conditions", [])
        }
        if found.get("Ready") != "True":
            waiting.append(str(item["metadata"]["name"]))
    return waiting


OPERATOR_APPLICATION_NAMES = ("celery-reconciler", "celery-reconciler-rescue")


def operator_connections(dsn: str) -> int:
    """The operator's connections to the database of ``dsn``, as PostgreSQL counts them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = ANY(%s)",
            [list(OPERATOR_APPLICATION_NAMES)],
        ).fetchone()
    assert row is not None
    return int(row[0])


class ConnectionSampler:
    """The peak of the operator's connections, sampled in a thread from ``with`` to its end."""

    def __init__(self, dsn: str, *, interval_seconds: float = 0.1) -> None:
        self.dsn = dsn
        self.interval_seconds = interval_seconds
        self.peak = 0
        self.samples = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.peak = max(self.peak, operator_connections(self.dsn))
            self.samples += 1
            self._stopping.wait(self.interval_seconds)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join()
