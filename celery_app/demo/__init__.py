"""The demo app: journal entries whose insights a Celery worker extracts, reliably.

Run the worker with ``celery -A celery_app.demo worker -Q insights`` and the environment
variables ``CELERY_BROKER_URL`` and ``CELERY_RECONCILER_DSN``. The same app serves
``make demo`` and the integration tests, which start real workers as subprocesses.

* ``app``: the Celery app (``celery_app.demo.app``), configured with the reliability preset
  of ``celery_reconciler_worker.reliable``;
* ``tasks``: ``insights.tasks.extract_insights_task(entry_id)``;
* ``schema``: the ``journal_entry`` table, seeding, the ``task_runs`` record of every body
  run and the ``demo_faults`` table that makes chosen entries fail or hang.
"""

from celery_app.demo.app import app

__all__ = ["app"]
