"""The worker integration users adopt: a fenced task base class and a settings preset.

celery-reconciler dispatches ``spec.task.name(entry_id)`` with ``task id = fence token``.
This module is the worker's half of that contract. ``ReconciledTask``, before running the
body, claims the attempt in the ledger with one atomic ``UPDATE ... RETURNING``
(``ledger.start_attempt``): the task id must be the entry's current fence token, the entry
still ``queued`` and its lease live. Anything else — an ``acks_late`` redelivery of an old
attempt, a Redis visibility-timeout restore, a duplicate publish — is dropped without
running the body. After the body it records success, or on an exception schedules the
retry with the policy's backoff (``planning.after_failure``: the jitter bounds documented
there) or dead-letters after ``maxAttempts`` with the error (truncated, no secrets). The
worker's name in the ledger is ``$HOSTNAME`` — the pod name in Kubernetes, which is what the
operator's pod-restart hook matches.

Retries are never Celery countdowns (they live in worker memory and die with it): the ledger
stores ``next_attempt_at`` and the operator re-dispatches. So do not combine this base class
with ``autoretry_for`` or ``self.retry()``.

Adoption (10 lines)::

    import os
    from celery import Celery
    from celery_app import reliable

    app = Celery("insights", broker=os.environ["CELERY_BROKER_URL"])
    app.conf.update(reliable.recommended_settings(lease_seconds=15 * 60))

    @app.task(base=reliable.ReconciledTask, name="insights.tasks.extract_insights_task")
    def extract_insights_task(entry_id: str) -> None:
        ...  # process the entry; commit; raise on failure

and run the worker with ``CELERY_RECONCILER_DSN`` set to the database that holds the table
(the ledger lives there, in schema ``celery_reconciler``). The entry id arrives as text.

Importing this module also connects a handler to Celery's ``task_unknown`` signal: when a
worker receives one of our messages for a task name it does not register, the delivery is
recorded as a failed attempt with the error "no task named ... is registered", so a typo in
``spec.task.name`` ends as a dead entry with that reason instead of silent re-dispatch.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import celery
import celery.exceptions
import celery.signals
import psycopg

from celery_reconciler import ledger, planning

DSN_ENVIRONMENT_VARIABLE = "CELERY_RECONCILER_DSN"
WORKER_ENVIRONMENT_VARIABLE = "HOSTNAME"
DEFAULT_LEASE_SECONDS = 15 * 60.0
# Redis re-queues an unacked message after the visibility timeout. Longer than the lease, a
# crashed worker's message comes back only after the operator already re-dispatched it (and
# fencing drops it); shorter, it would come back while its attempt may still be running.
VISIBILITY_TIMEOUT_LEASE_FACTOR = 1.5

logger = logging.getLogger(__name__)

# How long a worker waits before handing a delivery back when the ledger is unreachable.
REQUEUE_PAUSE_SECONDS = 2.0


class LedgerUnavailable(RuntimeError):
    """The worker cannot reach the ledger, so it must not run the body (it could not fence)."""


def recommended_settings(*, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> dict[str, Any]:
    """Celery settings under which the ledger's guarantees hold; merge with ``conf.update``.

    * ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after
      the body, so a killed worker's message is redelivered (and fenced) instead of vanishing.
    * ``worker_prefetch_multiplier=1``: a worker holds at most one unstarted message per
      process, so a crash strands as few leases as possible.
    * ``visibility_timeout`` = 1.5 x lease: see ``VISIBILITY_TIMEOUT_LEASE_FACTOR``.
    * JSON only: the operator publishes JSON messages.

    Retry timing is not a Celery setting here: it is ``spec.retry`` of the ProcessingPolicy,
    whose defaults mirror the seed's Celery settings (60 s initial delay, 5 attempts, jitter).
    """
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": int(lease_seconds * VISIBILITY_TIMEOUT_LEASE_FACTOR) + 1
        },
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
    }


RECOMMENDED_SETTINGS = recommended_settings()


def worker_name() -> str:
    return os.environ.get(WORKER_ENVIRONMENT_VARIABLE) or socket.gethostname()


def _dsn() -> str:
    dsn = os.environ.get(DSN_ENVIRONMENT_VARIABLE)
    if not dsn:
        raise LedgerUnavailable(
            f"{DSN_ENVIRONMENT_VARIABLE} is not set: the worker needs the DSN of the database "
            "that holds the ledger (the same database as the entries table)"
        )
    return dsn


class _LedgerConnection:
    """One ledger connection per worker process, opened lazily after the pool forks.

    A connection inherited across ``fork`` is never used nor closed in the child (closing
    would end the parent's session), only kept referenced; the child opens its own.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._connection: psycopg.Connection[Any] | None = None
        self._inherited: list[psycopg.Connection[Any]] = []

    def get(self) -> psycopg.Connection[Any]:
        if self._connection is not None and self._pid != os.getpid():
            self._inherited.append(self._connection)
            self._connection = None
        if self._connection is None or self._connection.closed:
            dsn = _dsn()
            try:
                connection = ledger.connect(dsn, application_name=f"celery-worker {worker_name()}")
                ledger.ensure_schema(connection)
            except ledger.DatabaseUnavailable as error:
                raise LedgerUnavailable(str(error)) from None
            except psycopg.Error as error:
                raise LedgerUnavailable(
                    str(ledger.unavailable(error, dsn=dsn, doing="preparing the ledger"))
                ) from None
            self._connection, self._pid = connection, os.getpid()
        return self._connection

    def failed(self) -> None:
        """Drop a connection that raised, so the next task reconnects."""
        if self._connection is not None and self._pid == os.getpid():
            try:
                self._connection.close()
            finally:
                self._connection = None


_ledger_connection = _LedgerConnection()


def _secrets() -> tuple[str, ...]:
    found: list[str] = []
    dsn = os.environ.get(DSN_ENVIRONMENT_VARIABLE)
    if dsn:
        found.extend(ledger.dsn_secrets(dsn))
    app = celery.current_app
    broker_url = str(app.conf.broker_url or "")
    if broker_url:
        found.append(broker_url)
    return tuple(found)


def describe_error(error: BaseException) -> str:
    """``Type: message``, with credentials removed and truncated for the ledger."""
    text = f"{type(error).__name__}: {error}"
    return ledger.sanitize_error(text, secrets=_secrets())


def _ledger_call(doing: str, call: Any, **kwargs: Any) -> Any:
    """Run one ledger statement; a connection that died (say, the database restarted since
    the last task) is replaced and the statement tried once more. Each ledger statement is
    a single atomic UPDATE guarded by the fence token, so a second try can never apply it
    twice: at worst it finds the work already done and reports so."""
    try:
        return call(_ledger_connection.get(), **kwargs)
    except (psycopg.OperationalError, psycopg.InterfaceError):
        _ledger_connection.failed()
    try:
        return call(_ledger_connection.get(), **kwargs)
    except (psycopg.OperationalError, psycopg.InterfaceError) as error:
        _ledger_connection.failed()
        raise LedgerUnavailable(str(ledger.unavailable(error, dsn=_dsn(), doing=doing))) from None


def record_failed_attempt(attempt: ledger.RunningAttempt, error: BaseException) -> str | None:
    """Schedule the retry (policy backoff with jitter) or dead-letter; returns the new state."""
    decision = planning.after_failure(attempt=attempt.attempt, retry=attempt.retry)
    retry_in = decision.delay_seconds if isinstance(decision, planning.RetryLater) else None
    state: str | None = _ledger_call(
        "recording a failed attempt",
        ledger.record_failure,
        fence_token=attempt.fence_token,
        error=describe_error(error),
        retry_in_seconds=retry_in,
    )
    return state


class ReconciledTask(celery.Task):  # type: ignore[misc]
    """A Celery task whose body runs at most once at a time per entry, fenced by the ledger.

    The first positional argument is the entry id (as the operator sends it). Use it as
    ``@app.task(base=ReconciledTask, name=...)``.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            # A plain Python call (``extract(entry_id)`` in a shell or a unit test) is not a
            # delivery: there is no fence to check and nothing to record.
            return super().__call__(*args, **kwargs)
        entry_id = str(args[0]) if args else str(kwargs.get("entry_id"))
        fence_token = str(self.request.id)
        try:
            attempt: ledger.RunningAttempt | None = _ledger_call(
                "checking the fence token",
                ledger.start_attempt,
                fence_token=fence_token,
                entry_id=entry_id,
                worker=worker_name(),
            )
        except LedgerUnavailable as error:
            # Without the fence check the body must not run, but the delivery must not be
            # spent either: back into the queue, so it runs as soon as the database is back
            # instead of after the lease. The pause keeps a worker from spinning meanwhile.
            logger.warning(
                "entry %s: %s; returning the delivery to the queue in %.0f s",
                entry_id,
                error,
                REQUEUE_PAUSE_SECONDS,
            )
            time.sleep(REQUEUE_PAUSE_SECONDS)
            raise celery.exceptions.Reject(str(error), requeue=True) from None
        if attempt is None:
            logger.info(
                "dropped a stale delivery of entry %s (task id %s is not the entry's current "
                "fence token, or the entry is no longer queued): the body did not run",
                entry_id,
                fence_token,
            )
            return None
        try:
            result = super().__call__(*args, **kwargs)
        except Exception as error:
            state = record_failed_attempt(attempt, error)
            logger.warning(
                "entry %s attempt %d failed (%s); ledger state now %s",
                entry_id,
                attempt.attempt,
                type(error).__name__,
                state or "unchanged: the lease was lost",
            )
            raise
        if not _ledger_call(
            "recording success", ledger.record_success, fence_token=attempt.fence_token
        ):
            logger.warning(
                "entry %s attempt %d finished after its lease was lost; the operator settles "
                "it from the table",
                entry_id,
                attempt.attempt,
            )
        return result


def _record_unknown_task(
    sender: Any = None, name: str | None = None, id: str | None = None, **_: Any
) -> None:
    """Charge an attempt to our entry whose message named a task this worker lacks."""
    dsn = os.environ.get(DSN_ENVIRONMENT_VARIABLE)
    if not dsn or not id:
        return
    worker = worker_name()
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
            decision = planning.after_failure(attempt=attempt.attempt, retry=attempt.retry)
            ledger.record_failure(
                conn,
                fence_token=attempt.fence_token,
                error=ledger.sanitize_error(error, secrets=_secrets()),
                retry_in_seconds=decision.delay_seconds
                if isinstance(decision, planning.RetryLater)
                else None,
            )
    except (ledger.DatabaseUnavailable, psycopg.Error) as failure:
        logger.error("could not record unknown task %r in the ledger: %s", name, failure)


celery.signals.task_unknown.connect(_record_unknown_task, weak=False)
