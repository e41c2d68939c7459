"""A stock Celery app — no celery-reconciler code at all — whose task records what it got.

``test_broker_messages`` runs ``celery -A celery_probe worker`` on it to prove that the
messages our pipelined publisher builds are consumed exactly like ``send_task`` ones. The
task retries once through Celery's own ``self.retry`` so the retry path is covered too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import celery
import psycopg

QUEUE = "probe"

app = celery.Celery("probe", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


def _record(task: Any, entry_id: str) -> None:
    request = task.request
    seen = {
        "args": list(request.args or ()),
        "kwargs": request.kwargs,
        "retries": request.retries,
        "timelimit": list(request.timelimit or ()),
        "argsrepr": request.argsrepr,
        "kwargsrepr": request.kwargsrepr,
        "root_id_is_id": request.root_id == request.id,
        "parent_is_self": request.parent_id == request.id,
        "has_parent": request.parent_id is not None,
        "group": request.group,
        "eta": request.eta,
        "expires": request.expires,
        "ignore_result": request.ignore_result,
        "correlation_id_is_id": request.correlation_id == request.id,
        "delivery_info": dict(request.delivery_info or {}),
        "has_origin": bool(request.origin),
        "has_reply_to": bool(request.reply_to),
    }
    with psycopg.connect(os.environ["PROBE_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO probe_runs (task_id, entry_id, seen) VALUES (%s, %s, %s)",
            [request.id, entry_id, json.dumps(seen, default=str)],
        )
    if request.retries == 0:
        raise task.retry(countdown=0, max_retries=1)


record = app.task(bind=True, name="probe.record")(_record)
