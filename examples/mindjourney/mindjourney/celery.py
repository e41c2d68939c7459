"""The project's Celery app: Django's settings under the ``CELERY_`` namespace, tasks found
in each installed app's ``tasks.py``, and celery-reconciler's reliability preset on top.

What the original app had here and no longer needs: a ``beat_schedule`` re-queuing
unprocessed entries every 5 minutes, and retry settings (``task_default_retry_delay``, max
retries). The ProcessingPolicy's sweep and ``spec.retry`` replace both.
"""

import os

from celery import Celery

from celery_reconciler_worker import django as reliable_django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mindjourney.settings")

app = Celery("mindjourney")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The lease must be the policy's spec.lease.timeout (processingpolicy.yaml): it sizes
# Redis' visibility timeout so a lost message comes back only after the operator rescued it.
# The Django preset also lets CONN_MAX_AGE keep a pool process's connection between tasks.
app.conf.update(reliable_django.recommended_settings(lease_seconds=15 * 60))
app.autodiscover_tasks()
