"""The task body both worker-benchmark variants run: pretend work, then mark the row.

``BENCH_BODY_SECONDS`` of sleep stands for the work; the mark is one autocommit UPDATE that
also stamps the database's clock, from which the benchmark reads the drain rate. It imports
no celery-reconciler code, so the baseline worker runs none.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

BODY_SECONDS = float(os.environ.get("BENCH_BODY_SECONDS", "0"))

# The mark every form of the benchmark writes (the fenced ones inside their transaction).
MARK_PROCESSED = (
    "UPDATE journal_entry SET insights_extracted = true, "
    "insights = jsonb_build_object('at', clock_timestamp()) WHERE id = %s"
)

_connections: dict[int, psycopg.Connection[Any]] = {}


def mark_processed(entry_id: str) -> None:
    if BODY_SECONDS:
        time.sleep(BODY_SECONDS)
    conn = _connections.get(os.getpid())
    if conn is None:
        conn = _connections[os.getpid()] = psycopg.connect(
            os.environ["CELERY_RECONCILER_DSN"], autocommit=True
        )
    conn.execute(MARK_PROCESSED, [int(entry_id)])
