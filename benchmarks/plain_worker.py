"""The baseline of the worker benchmark: a stock Celery app, no celery-reconciler code at all.

Its task does what a plain Celery task that processes an entry must do at the least: mark
the entry's row processed (``worker_body``, after ``BENCH_BODY_SECONDS`` of pretend work),
with nothing around it. The settings are the ones ours runs with (late acks, prefetch 1,
JSON), written out here so that nothing of ``celery_app`` is imported into this worker.
"""

from __future__ import annotations

import os

import celery

from benchmarks import worker_body

QUEUE = "bench-plain"
TASK_NAME = "bench.plain"

app = celery.Celery("bench-plain", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

plain = app.task(name=TASK_NAME)(worker_body.mark_processed)
