"""Ours in the worker benchmark: the same body as ``plain_worker``, as a ``ReconciledTask``.

Settings are ``reliable.recommended_settings`` (what users are told to use); the body is
``worker_body.mark_processed``, so the two variants differ only by the worker integration:
the fence check before the body and the heartbeat, which also marks bodies done.
"""

from __future__ import annotations

import os

import celery

from benchmarks import worker_body
from celery_reconciler_worker import reliable

QUEUE = "bench-reconciled"
TASK_NAME = "bench.reconciled"

app = celery.Celery("bench-reconciled", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(reliable.recommended_settings())
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, worker_hijack_root_logger=False)

reconciled = app.task(base=reliable.ReconciledTask, name=TASK_NAME)(worker_body.mark_processed)
