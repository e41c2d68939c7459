"""The demo's Celery app, configured the way we recommend users configure theirs."""

from __future__ import annotations

import celery

from celery_app.demo import settings
from celery_reconciler_worker import reliable

app = celery.Celery("insights", broker=settings.BROKER_URL, include=["celery_app.demo.tasks"])
app.conf.update(reliable.recommended_settings(lease_seconds=settings.LEASE_SECONDS))
app.conf.task_default_queue = settings.QUEUE
# The ledger is the record of outcomes; the demo needs no result backend.
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False
