"""What the worker does beside its bodies, connected to Celery's signals on import.

* at start (``worker_init``): refuse to run ``ReconciledTask`` tasks without a ledger DSN,
  then start the guardian (``guardian``);
* for a message naming a task the worker lacks (``task_unknown``): charge the attempt, so a
  typo in ``spec.task.name`` ends as a dead entry with that reason;
* as a process that ran bodies exits: hand over what its bodies finished.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any

import celery
import celery.signals
import psycopg

from celery_reconciler_worker import backoff, connection, guardian, identity, incarnation, ledger
from celery_reconciler_worker import task as reconciled_task

logger = logging.getLogger(__name__)


def _record_unknown_task(
    sender: Any = None, name: str | None = None, id: str | None = None, **_: Any
) -> None:
    """Charge an attempt to our entry whose message named a task this worker lacks."""
    dsn = connection.current().dsn()
    if not dsn or not id:
        return
    worker = identity.worker_name()
    error = (
        f"NotRegistered: no task named {name!r} is registered on worker {worker} — fix "
        "spec.task.name or deploy workers that register it (then retry-dead)"
    )
    # A short-lived connection: this runs in the worker's main process, which forks pool
    # processes and so must not hold a connection of its own.
    try:
        with ledger.connect(dsn, application_name=f"celery-worker {worker}") as conn:
            ledger.ensure_schema(conn)
            attempt = ledger.start_attempt(conn, fence_token=id, entry_id=None, worker=worker)
            if attempt is None:
                return
            retry = ledger.retry_rules(conn, policy_key=attempt.policy_key)
            decision = backoff.after_failure(attempt=attempt.attempt, retry=retry)
            ledger.record_failure(
                conn,
                fence_token=attempt.fence_token,
                error=ledger.sanitize_error(error, secrets=connection.secrets()),
                retry_in_seconds=decision.delay_seconds
                if isinstance(decision, backoff.RetryLater)
                else None,
            )
    except (ledger.DatabaseUnavailable, psycopg.Error) as failure:
        logger.error("could not record unknown task %r in the ledger: %s", name, failure)


celery.signals.task_unknown.connect(_record_unknown_task, weak=False)


def _hand_over_finished(**_: Any) -> None:
    incarnation.current.hand_over_finished()


# A prefork pool process runs bodies and exits on its own; solo and threads run them in the
# worker's main process.
celery.signals.worker_process_shutdown.connect(_hand_over_finished, weak=False)
celery.signals.worker_shutdown.connect(_hand_over_finished, weak=False)


def _refuse_to_start_without_the_ledger(sender: Any = None, **_: Any) -> None:
    """A worker whose app registers a ``ReconciledTask`` but has no ledger DSN could never
    pass a fence check: it would hand every delivery back, forever, while looking healthy.
    It stops at start instead, saying what to set."""
    app = getattr(sender, "app", None)
    tasks = getattr(app, "tasks", {}) if app is not None else {}
    # Tasks first: loading them imports the modules that may install another connection.
    if not any(isinstance(task, reconciled_task.ReconciledTask) for task in tasks.values()):
        return
    if connection.current().dsn():
        return
    message = (
        f"{connection.DSN_ENVIRONMENT_VARIABLE} is not set: this worker runs ReconciledTask "
        "tasks, which need the DSN of the database holding the ledger (the same database as "
        "the entries table) — set it in the worker's environment, e.g. from the Secret the "
        "policy's spec.source.databaseSecretRef names"
    )
    logger.critical("%s", message)
    raise SystemExit(message)  # a plain exception would be logged and the worker would go on


celery.signals.worker_init.connect(_refuse_to_start_without_the_ledger, weak=False)


_guardian: subprocess.Popen[bytes] | None = None


def _start_guardian(sender: Any = None, **_: Any) -> None:
    """Start this worker's guardian, for a worker that runs ``ReconciledTask`` tasks."""
    global _guardian
    app = getattr(sender, "app", None)
    tasks = getattr(app, "tasks", {}) if app is not None else {}
    dsn = connection.current().dsn()
    if dsn and any(isinstance(task, reconciled_task.ReconciledTask) for task in tasks.values()):
        _guardian = guardian.start(dsn=dsn, timeout_seconds=incarnation.heartbeat_timeout_seconds())


celery.signals.worker_init.connect(_start_guardian, weak=False)
