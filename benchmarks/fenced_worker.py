"""The worker benchmark's ``fenced_transaction`` form: exactly-once effects, psycopg.

The same pretend work and the same row mark as ``plain_worker``, as a ``ReconciledTask``
whose mark commits with the attempt's done mark through ``reliable.fenced_transaction``, on
the body's own connection — what the README recommends for writes in the ledger's database.
"""

from __future__ import annotations

import os
import time
from typing import Any

import celery
import psycopg

from benchmarks import worker_body
from celery_reconciler_worker import reliable

QUEUE = "bench-fenced"
TASK_NAME = "bench.fenced"

app = celery.Celery("bench-fenced", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(reliable.recommended_settings())
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, worker_hijack_root_logger=False)

_connections: dict[int, psycopg.Connection[Any]] = {}


def mark_processed_fenced(entry_id: str) -> None:
    if worker_body.BODY_SECONDS:
        time.sleep(worker_body.BODY_SECONDS)
    conn = _connections.get(os.getpid())
    if conn is None:
        conn = _connections[os.getpid()] = psycopg.connect(
            os.environ["CELERY_RECONCILER_DSN"], autocommit=True
        )
    with reliable.fenced_transaction(conn):
        conn.execute(worker_body.MARK_PROCESSED, [int(entry_id)])


fenced = app.task(base=reliable.ReconciledTask, name=TASK_NAME)(mark_processed_fenced)
