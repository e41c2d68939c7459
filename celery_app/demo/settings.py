"""The demo's names and its environment-driven settings, in one plain module.

``CELERY_BROKER_URL`` (required to run a worker), ``CELERY_RECONCILER_DSN`` (the database of
the entries and of the ledger) and ``DEMO_LEASE_SECONDS`` (the policy's lease, used to size
Redis' visibility timeout; default 15 minutes).
"""

from __future__ import annotations

import os

from celery_reconciler_worker import reliable

QUEUE = "insights"
TASK_NAME = "insights.tasks.extract_insights_task"
BROKER_URL = os.environ.get("CELERY_BROKER_URL")
LEASE_SECONDS = float(os.environ.get("DEMO_LEASE_SECONDS", str(reliable.DEFAULT_LEASE_SECONDS)))
