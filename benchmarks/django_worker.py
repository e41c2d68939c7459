"""The worker benchmark's ``fenced_atomic`` form: exactly-once effects, Django.

The same pretend work and the same row mark as ``plain_worker``, as the Django integration's
``ReconciledTask`` (the fence check on Django's connection) whose mark commits with the done
mark in ``fenced_atomic()``. Settings: ``benchmarks.django_settings``; Celery's Django fixup
runs as in a user's project (``DJANGO_SETTINGS_MODULE`` is set before Django starts).
"""

from __future__ import annotations

import os
import time

import celery
import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.django_settings")
django.setup()

from django.db import connection  # noqa: E402  (Django must be set up first)

from benchmarks import worker_body  # noqa: E402
from celery_reconciler_worker import django as reliable_django  # noqa: E402

QUEUE = "bench-atomic"
TASK_NAME = "bench.atomic"

app = celery.Celery("bench-atomic", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(reliable_django.recommended_settings())
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, worker_hijack_root_logger=False)


def mark_processed_atomic(entry_id: str) -> None:
    if worker_body.BODY_SECONDS:
        time.sleep(worker_body.BODY_SECONDS)
    with reliable_django.fenced_atomic(), connection.cursor() as cursor:
        cursor.execute(worker_body.MARK_PROCESSED, [int(entry_id)])


atomic = app.task(base=reliable_django.ReconciledTask, name=TASK_NAME)(mark_processed_atomic)
