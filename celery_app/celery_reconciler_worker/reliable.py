"""The worker integration users adopt: a fenced task base class and a settings preset.

celery-reconciler dispatches ``spec.task.name(entry_id)`` with ``task id = fence token``.
This module is the worker's half of that contract. ``ReconciledTask``, before running the
body, claims the attempt in the ledger with one atomic ``UPDATE ... RETURNING``
(``ledger.start_attempt``): the task id must be the entry's current fence token, the entry
still ``queued`` and its lease live. Anything else — an ``acks_late`` redelivery of an old
attempt, a Redis visibility-timeout restore, a duplicate publish — is dropped without
running the body. After the body it records success, or on an exception schedules the
retry with the policy's backoff (``backoff.after_failure``: the jitter bounds documented
there) or dead-letters after ``maxAttempts`` with the error (truncated, no secrets).

Each worker process that runs bodies is an *incarnation* in the ledger (``incarnation``):
registered by its first body, tied to its pod by the Downward API env and its container
instance (``identity``), kept alive by a heartbeat thread, and guarded by a watchdog thread
(``watchdog``) that kills the process — and so its bodies — when it cannot renew within
half its timeout, before the operator may hand those entries to someone else. A process
that cannot run its own threads (paused, or a body holding the GIL) is killed from outside
by the worker's guardian (``guardian``), which then records the proof in the ledger; a
container frozen as a whole, by the kubelet through the liveness probe (``probe``). A body
may commit its own writes together with the done mark (``fenced_transaction``):
exactly-once effects for work in the ledger's database. ``$HOSTNAME`` is only a display
name.

Retries are never Celery countdowns (they live in worker memory and die with it): the ledger
stores ``next_attempt_at`` and the operator re-dispatches. So do not combine this base class
with ``autoretry_for`` or ``self.retry()``.

Adoption::

    import os
    from celery import Celery
    from celery_reconciler_worker import reliable

    app = Celery("insights", broker=os.environ["CELERY_BROKER_URL"])
    app.conf.update(reliable.recommended_settings(lease_seconds=15 * 60))

    @app.task(base=reliable.ReconciledTask, name="insights.tasks.extract_insights_task")
    def extract_insights_task(entry_id: str) -> None:
        with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
            insights = ...  # read and compute; raise on failure
            with reliable.fenced_transaction(conn):  # the writes + the done mark, atomically
                conn.execute("UPDATE journal_entry SET insights = %s, ...", ...)

and run the worker with ``CELERY_RECONCILER_DSN`` set to the database that holds the table
(the ledger lives there, in schema ``celery_reconciler``) and the ``CELERY_RECONCILER_POD_*``
variables from the Downward API. The entry id arrives as text.

Importing this module also connects the worker's signal handlers (``lifecycle``): at
start it refuses to run without a ledger DSN and starts the guardian; when a worker receives
one of our messages for a task name it does not register, the delivery is recorded as a
failed attempt with the error "no task named ... is registered", so a typo in
``spec.task.name`` ends as a dead entry with that reason instead of silent re-dispatch.
On RabbitMQ a worker consumes each of its queues' rescue queue (``rescue_queue``) as well,
where the operator sends rescued work so that it runs next.

This module only gathers the public names; each lives in a module with one job:
``settings`` (the Celery settings), ``connection`` (the ledger connection of a process, and
``ProcessLocalConnection``, a connection per worker process for a body's own writes),
``identity`` (which container a process runs in), ``incarnation`` (registration and
heartbeat), ``watchdog`` (the in-process self-fence), ``ticks``, ``guardian`` and ``probe``
(stopping a process from outside), ``task`` (the task base and the fenced commit),
``lifecycle`` (the signal handlers), ``rescue_queue`` (the queues rescued work waits in).
"""

from __future__ import annotations

from celery_reconciler_worker import lifecycle as lifecycle
from celery_reconciler_worker import rescue_queue as rescue_queue
from celery_reconciler_worker.connection import (
    DSN_ENVIRONMENT_VARIABLE,
    LedgerConnection,
    LedgerUnavailable,
    ProcessLocalConnection,
    describe_error,
    use_ledger_connection,
)
from celery_reconciler_worker.identity import (
    CONTAINER_NAME_VARIABLE,
    POD_NAME_VARIABLE,
    POD_NAMESPACE_VARIABLE,
    POD_UID_VARIABLE,
    WORKER_ENVIRONMENT_VARIABLE,
    worker_name,
)
from celery_reconciler_worker.incarnation import (
    DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
    HEARTBEAT_TIMEOUT_VARIABLE,
    HEARTBEATS_PER_TIMEOUT,
    heartbeat_timeout_seconds,
    worker_identity,
)
from celery_reconciler_worker.settings import (
    DEFAULT_LEASE_SECONDS,
    RECOMMENDED_SETTINGS,
    VISIBILITY_TIMEOUT_LEASE_FACTOR,
    recommended_settings,
)
from celery_reconciler_worker.task import (
    REQUEUE_PAUSE_SECONDS,
    FenceLost,
    ReconciledTask,
    fenced_commit,
    fenced_transaction,
    record_failed_attempt,
)
from celery_reconciler_worker.watchdog import WATCHDOG_PERIOD_SECONDS

__all__ = [
    "CONTAINER_NAME_VARIABLE",
    "DEFAULT_HEARTBEAT_TIMEOUT_SECONDS",
    "DEFAULT_LEASE_SECONDS",
    "DSN_ENVIRONMENT_VARIABLE",
    "HEARTBEATS_PER_TIMEOUT",
    "HEARTBEAT_TIMEOUT_VARIABLE",
    "POD_NAMESPACE_VARIABLE",
    "POD_NAME_VARIABLE",
    "POD_UID_VARIABLE",
    "RECOMMENDED_SETTINGS",
    "REQUEUE_PAUSE_SECONDS",
    "VISIBILITY_TIMEOUT_LEASE_FACTOR",
    "WATCHDOG_PERIOD_SECONDS",
    "WORKER_ENVIRONMENT_VARIABLE",
    "FenceLost",
    "LedgerConnection",
    "LedgerUnavailable",
    "ProcessLocalConnection",
    "ReconciledTask",
    "describe_error",
    "fenced_commit",
    "fenced_transaction",
    "heartbeat_timeout_seconds",
    "lifecycle",
    "recommended_settings",
    "record_failed_attempt",
    "use_ledger_connection",
    "worker_identity",
    "worker_name",
]
