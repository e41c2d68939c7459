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

Each worker process that runs bodies is an *incarnation* in the ledger (``_Incarnation``):
registered by its first body, tied to its pod by the Downward API env (pod uid; the
container id where the cgroup path shows it), kept alive by a heartbeat thread, and guarded
by a watchdog that kills the process — and so its bodies — when it cannot renew within half
its timeout, before the operator may hand those entries to someone else. A body may commit
its own writes together with the done mark (``fenced_transaction``): exactly-once effects
for work in the ledger's database. ``$HOSTNAME`` is only a display name.

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

Importing this module also connects a handler to Celery's ``task_unknown`` signal: when a
worker receives one of our messages for a task name it does not register, the delivery is
recorded as a failed attempt with the error "no task named ... is registered", so a typo in
``spec.task.name`` ends as a dead entry with that reason instead of silent re-dispatch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import celery
import celery.exceptions
import celery.signals
import psycopg

from celery_reconciler_worker import backoff, identity, ledger, ticks

DSN_ENVIRONMENT_VARIABLE = "CELERY_RECONCILER_DSN"
WORKER_ENVIRONMENT_VARIABLE = "HOSTNAME"
# Set these from the Downward API (see docs/concepts.md): they tie a worker process to the
# pod uid a pod event names. Without them a worker is judged by its heartbeat alone.
POD_NAME_VARIABLE = "CELERY_RECONCILER_POD_NAME"
POD_NAMESPACE_VARIABLE = "CELERY_RECONCILER_POD_NAMESPACE"
POD_UID_VARIABLE = "CELERY_RECONCILER_POD_UID"
CONTAINER_NAME_VARIABLE = "CELERY_RECONCILER_CONTAINER_NAME"
HEARTBEAT_TIMEOUT_VARIABLE = "CELERY_RECONCILER_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 20.0
# A heartbeat every fifth of the timeout: two can fail before the self-fence at one half.
HEARTBEATS_PER_TIMEOUT = 5
WATCHDOG_PERIOD_SECONDS = 0.25
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
    * ``worker_prefetch_multiplier=1`` and ``worker_disable_prefetch`` (Redis): a worker
      takes a message only when a pool process is free, so a crash strands no unstarted
      messages behind their lease.
    * ``visibility_timeout`` = 1.5 x lease: see ``VISIBILITY_TIMEOUT_LEASE_FACTOR``.
    * JSON only: the operator publishes JSON messages.

    Retry timing is not a Celery setting here: it is ``spec.retry`` of the ProcessingPolicy,
    whose defaults mirror the seed's Celery settings (60 s initial delay, 5 attempts, jitter).
    """
    return {
        "task_acks_late": True,
        # Take a message only when a pool process is free (Redis): a killed worker then
        # holds no prefetched messages that would wait out their lease.
        "worker_disable_prefetch": True,
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
    dsn = _ledger_connection.dsn()
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

    def dsn(self) -> str | None:
        return os.environ.get(DSN_ENVIRONMENT_VARIABLE)


class LedgerConnection(Protocol):
    """Where a worker process's fence checks and outcomes run (``use_ledger_connection``)."""

    def get(self) -> psycopg.Connection[Any]:
        """An autocommit psycopg 3 connection to the ledger's database, for this thread."""

    def failed(self) -> None:
        """The connection ``get`` returned raised: drop it, so the next ``get`` reconnects."""

    def dsn(self) -> str | None:
        """libpq conninfo of the same database, for the connections of our own (heartbeat,
        the main process's unknown-task records) and to hide its secrets from errors;
        ``None`` when not configured."""


_ledger_connection: LedgerConnection = _LedgerConnection()


def use_ledger_connection(connection: LedgerConnection) -> None:
    """Run this process's ledger statements on ``connection`` instead of a connection of our
    own to ``$CELERY_RECONCILER_DSN``: the seam through which a framework's connection
    (``celery_reconciler_worker.django``) carries the fence check and the done mark, so a
    body's writes and the done mark can share one transaction."""
    global _ledger_connection
    _ledger_connection = connection


def _secrets() -> tuple[str, ...]:
    found: list[str] = []
    dsn = _ledger_connection.dsn()
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


class FenceLost(RuntimeError):
    """The attempt no longer owns its entry: ``fenced_transaction`` rolled the body back."""


def heartbeat_timeout_seconds() -> float:
    raw = os.environ.get(HEARTBEAT_TIMEOUT_VARIABLE)
    if not raw:
        return DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 1.0 <= value <= 3600.0:
        raise ValueError(
            f"{HEARTBEAT_TIMEOUT_VARIABLE}={raw!r}: expected seconds between 1 and 3600"
        )
    return value


def worker_identity() -> ledger.WorkerIdentity:
    pod_uid = os.environ.get(POD_UID_VARIABLE) or None
    return ledger.WorkerIdentity(
        hostname=worker_name(),
        pid=os.getpid(),
        pod_name=os.environ.get(POD_NAME_VARIABLE) or None,
        pod_namespace=os.environ.get(POD_NAMESPACE_VARIABLE) or None,
        pod_uid=pod_uid,
        container_id=identity.container_id(pod_uid),
        container_name=os.environ.get(CONTAINER_NAME_VARIABLE) or None,
        container_started_at=identity.container_started_at(pod_uid),
    )


def _stop_own_bodies() -> None:
    """Self-fencing: kill this process, and with it every body it runs, before the operator
    may hand their entries to another worker. The pool (or the kubelet) starts a new one.

    Nothing before the kill: a log handler blocked on its stream (likely in the very
    partition that stopped the heartbeat) would mean no kill. The guardian sees the process
    gone with bodies running and records why."""
    os.kill(os.getpid(), signal.SIGKILL)


class _Incarnation:
    """This process's life in the ledger: its id, its heartbeat and its self-fence.

    Registered lazily by the first body a process runs (after the pool forked it), so a
    prefork parent, which runs no bodies, never has one. Two daemon threads serve it:

    * the heartbeat renews it every ``timeout / HEARTBEATS_PER_TIMEOUT`` on a connection of
      its own (one statement however many bodies run, bounded by a statement and a lock
      timeout), which also pushes the leases of the attempts it runs;
    * the watchdog does no I/O at all: it publishes this process's tick for the guardian
      (``ticks``) and, while a body runs, if the last renewal that succeeded was *sent*
      more than ``timeout / 2`` ago — or the operator has ended the incarnation, or a body
      still runs under an incarnation this process has left — it kills the process. A hung
      connection cannot delay it.

    That watchdog is the fast path. A process that cannot run its threads at all (paused, or
    a body holding the GIL) stops ticking, and its guardian kills it from outside
    (``guardian``).

    The operator ends an incarnation only after ``timeout`` without a heartbeat (both
    measured on the database's clock from the same rows), or on the guardian's proof that
    its process is gone, so a worker that cannot renew has stopped its bodies at least
    ``timeout / 2`` before anyone may re-dispatch them on silence.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self.id: uuid.UUID | None = None
        self.timeout_seconds = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
        self._renewed_at = 0.0  # time.monotonic() when the last successful renewal was sent
        self._ended = False
        # Bodies running, by the incarnation they started under: a re-registration does not
        # forget the bodies of the incarnation it replaces (they are killed, not orphaned).
        self._running: dict[uuid.UUID, int] = {}
        self._threads_for: int | None = None
        self._ticks: ticks.Publisher | None = None
        # Attempts whose body finished while the ledger was unreachable: the next heartbeat
        # that gets through releases them, instead of renewing them for as long as we live.
        self._unrecorded: set[uuid.UUID] = set()
        # Bodies that succeeded, to be marked so by the next fence check or heartbeat.
        self._finished: set[uuid.UUID] = set()
        # The threads pool starts bodies concurrently: every registration happens under it.
        self._registering = threading.Lock()

    def _stale(self) -> bool:
        return time.monotonic() - self._renewed_at > self.timeout_seconds / 2

    def ready_for_a_body(self) -> uuid.UUID:
        """The id to start an attempt under: registered, not ended, renewed within half its
        timeout (renewing now, through the task's ledger connection, if it is not)."""
        with self._registering:
            return self._ready()

    def register_again(self, *, instead_of: uuid.UUID) -> None:
        """The ledger refused ``instead_of`` (ended, or not renewed in time): register anew
        — unless another body of this process already did, so that concurrent refusals
        make one new incarnation, not one each (all but the last would be orphaned)."""
        with self._registering:
            if self.id == instead_of:
                self._register()

    def _ready(self) -> uuid.UUID:
        if self._pid != os.getpid():
            self.id, self._pid, self._running = None, os.getpid(), {}
            self._unrecorded, self._finished = set(), set()
        if self.id is not None and not self._ended and self._stale():
            sent = time.monotonic()
            if _ledger_call("renewing the heartbeat", ledger.heartbeat, incarnation=self.id):
                self._renewed_at = sent
            else:
                self._ended = True
        if self.id is None or self._ended:
            self._register()
        self._start_threads()
        assert self.id is not None
        return self.id

    def _register(self) -> None:
        if self._running:
            # The incarnation they run under was ended or refused: their entries may be
            # re-dispatched already. They die before anything starts under a new one.
            _stop_own_bodies()
        self.timeout_seconds = heartbeat_timeout_seconds()
        sent = time.monotonic()
        incarnation: uuid.UUID = _ledger_call(
            "registering the worker process",
            ledger.register_incarnation,
            identity=worker_identity(),
            heartbeat_timeout_seconds=self.timeout_seconds,
        )
        with self._lock:
            self.id, self._renewed_at, self._ended = incarnation, sent, False
            self._unrecorded = set()  # the ended incarnation's attempts are the operator's now
            self._tick()
        logger.info(
            "worker process %d is incarnation %s (heartbeat timeout %.0f s)",
            os.getpid(),
            incarnation,
            self.timeout_seconds,
        )

    def outcome_unrecorded(self, fence_token: uuid.UUID) -> None:
        with self._lock:
            self._unrecorded.add(fence_token)

    def body_succeeded(self, fence_token: uuid.UUID) -> None:
        with self._lock:
            self._finished.add(fence_token)

    def hand_over_finished(self) -> None:
        """Mark what this process's bodies finished, now rather than at the next heartbeat:
        called as the process exits, so the sweep does not find them under a silent
        incarnation (it would charge their attempts as lost before settling them)."""
        with self._lock:
            incarnation, pid = self.id, self._pid
            finished, unrecorded = tuple(self._finished), tuple(self._unrecorded)
        if incarnation is None or pid != os.getpid() or not (finished or unrecorded):
            return
        try:
            _ledger_call(
                "handing over finished bodies",
                ledger.heartbeat,
                incarnation=incarnation,
                unrecorded=unrecorded,
                finished=finished,
            )
        except LedgerUnavailable as error:
            logger.warning("could not hand over %d finished bodies: %s", len(finished), error)
            return
        with self._lock:
            self._finished.difference_update(finished)
            self._unrecorded.difference_update(unrecorded)

    @contextlib.contextmanager
    def running_a_body(self, *, incarnation: uuid.UUID) -> Iterator[None]:
        with self._lock:
            self._running[incarnation] = self._running.get(incarnation, 0) + 1
            self._tick()
        try:
            yield
        finally:
            with self._lock:
                self._running[incarnation] -= 1
                if not self._running[incarnation]:
                    del self._running[incarnation]
                self._tick()

    def _tick(self) -> None:
        """Publish this process's tick (under ``_lock``): memory stores, no I/O."""
        if self._ticks is None:
            return
        listed = tuple(self._running)
        if self.id is not None and self.id not in self._running:
            listed += (self.id,)
        self._ticks.publish(
            timeout_seconds=self.timeout_seconds,
            ticked_at=time.monotonic(),
            renewed_at=self._renewed_at,
            running=sum(self._running.values()),
            incarnations=listed,
        )

    def _start_threads(self) -> None:
        if self._threads_for == os.getpid():
            return
        self._threads_for = os.getpid()
        self._ticks = _tick_publisher()
        threading.Thread(
            target=self._heartbeat_forever, name="ledger-heartbeat", daemon=True
        ).start()
        threading.Thread(target=self._watch_forever, name="ledger-watchdog", daemon=True).start()

    def _heartbeat_forever(self) -> None:
        connection = None
        while True:
            period_seconds = self.timeout_seconds / HEARTBEATS_PER_TIMEOUT
            time.sleep(period_seconds)
            with self._lock:
                incarnation, unrecorded = self.id, tuple(self._unrecorded)
                finished = tuple(self._finished)
            if incarnation is None or (self._ended and not finished and not unrecorded):
                continue  # an ended incarnation still hands over what its bodies finished
            sent = time.monotonic()
            try:
                if connection is None or connection.closed:
                    # A slow database fails one heartbeat, which the next one retries,
                    # instead of holding the thread until the watchdog's deadline.
                    connection = ledger.connect(
                        _dsn(),
                        application_name=f"celery-worker {worker_name()} heartbeat",
                        connect_timeout_seconds=max(1, int(self.timeout_seconds / 4)),
                        tcp_user_timeout_seconds=self.timeout_seconds / 2,
                        statement_timeout_seconds=period_seconds,
                        lock_timeout_seconds=period_seconds / 2,
                    )
                alive = ledger.heartbeat(
                    connection, incarnation=incarnation, unrecorded=unrecorded, finished=finished
                )
            except (ledger.DatabaseUnavailable, LedgerUnavailable, psycopg.Error) as error:
                logger.warning("heartbeat of incarnation %s failed: %s", incarnation, error)
                if connection is not None:
                    connection.close()
                connection = None
                continue
            with self._lock:
                self._unrecorded.difference_update(unrecorded)
                self._finished.difference_update(finished)
                if incarnation != self.id:
                    continue  # re-registered meanwhile; this answer is about the old one
                if alive:
                    self._renewed_at = max(self._renewed_at, sent)
                else:
                    self._ended = True

    def _watch_forever(self) -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD_SECONDS)
            with self._lock:
                self._tick()
                must_stop = bool(self._running) and (
                    self._ended or self._stale() or any(i != self.id for i in self._running)
                )
            if must_stop:
                _stop_own_bodies()


def _tick_publisher() -> ticks.Publisher | None:
    """This process's tick record in its worker's run directory (``None`` without a
    guardian: a body run outside ``celery worker``)."""
    directory = os.environ.get(ticks.RUN_DIRECTORY_VARIABLE)
    if not directory:
        return None
    try:
        return ticks.Publisher(
            ticks.body_file(Path(directory), os.getpid()),
            pid=os.getpid(),
            start_ticks=identity.process_start_ticks(os.getpid()) or 0,
        )
    except OSError as error:
        logger.error("no tick for the guardian in %s: %s", directory, error)
        return None


_incarnation = _Incarnation()


@dataclasses.dataclass
class _CurrentAttempt:
    attempt: ledger.RunningAttempt
    recorded: bool = False


_current_attempt: contextvars.ContextVar[_CurrentAttempt | None] = contextvars.ContextVar(
    "celery_reconciler_attempt", default=None
)


@contextlib.contextmanager
def fenced_transaction(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Commit the body's writes and the done mark together, or neither: exactly-once effects
    for work in the same database as the ledger.

    Use it around the body's final writes, on the body's own psycopg connection::

        with reliable.fenced_transaction(conn):
            conn.execute("INSERT INTO insights ...")
            conn.execute("UPDATE journal_entry SET insights_extracted = true ...")

    Before the commit it marks the attempt succeeded inside the same transaction; that UPDATE
    locks the entry's ledger row and matches only while the attempt still owns it (its fence
    token, state ``running``). If the operator already handed the entry to another attempt,
    nothing matches: the whole transaction rolls back and ``FenceLost`` is raised (the task
    then ends quietly). An operator that comes later waits for the row lock and finds the
    entry succeeded. Outside this helper a body's effects are at-least-once.
    """
    current = _current_attempt.get()
    if current is None:
        raise RuntimeError("fenced_transaction is for the body of a ReconciledTask delivery")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        # Inside the caller's open transaction this would only be a savepoint, and the done
        # mark would wait for a commit that may never come.
        raise RuntimeError(
            "fenced_transaction needs a connection outside any transaction (commit or roll "
            "back first, or use an autocommit connection): it must own the commit"
        )
    with conn.transaction():
        yield conn
        if not ledger.record_success(conn, fence_token=current.attempt.fence_token):
            raise FenceLost(
                f"entry {current.attempt.entry_id}: attempt {current.attempt.attempt} lost its "
                "fence before committing; its writes were rolled back"
            )
    current.recorded = True


@contextlib.contextmanager
def fenced_commit(
    *,
    transaction: contextlib.AbstractContextManager[Any],
    connection: Callable[[], psycopg.Connection[Any]],
) -> Iterator[None]:
    """``fenced_transaction`` for a transaction that a framework begins and commits (say
    Django's ``transaction.atomic()``): the done mark is written on ``connection()`` — the
    connection ``transaction`` runs on, asked for once the transaction is open — just before
    ``transaction`` commits, and ``FenceLost`` rolls everything back."""
    current = _current_attempt.get()
    if current is None:
        raise RuntimeError("a fenced commit is for the body of a ReconciledTask delivery")
    with transaction:
        yield
        if not ledger.record_success(connection(), fence_token=current.attempt.fence_token):
            raise FenceLost(
                f"entry {current.attempt.entry_id}: attempt {current.attempt.attempt} lost its "
                "fence before committing; its writes were rolled back"
            )
    current.recorded = True


def record_failed_attempt(attempt: ledger.RunningAttempt, error: BaseException) -> str | None:
    """Schedule the retry (policy backoff with jitter) or dead-letter; returns the new state."""
    retry: backoff.Retry = _ledger_call(
        "reading the retry rules", ledger.retry_rules, policy_key=attempt.policy_key
    )
    decision = backoff.after_failure(attempt=attempt.attempt, retry=retry)
    retry_in = decision.delay_seconds if isinstance(decision, backoff.RetryLater) else None
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
            attempt, incarnation = self._start(entry_id=entry_id, fence_token=fence_token)
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
        current = _CurrentAttempt(attempt)
        token = _current_attempt.set(current)
        try:
            with _incarnation.running_a_body(incarnation=incarnation):
                result = super().__call__(*args, **kwargs)
        except FenceLost as error:
            logger.warning("%s", error)
            return None
        except Exception as error:
            try:
                state = record_failed_attempt(attempt, error)
            except LedgerUnavailable as unrecorded:
                _incarnation.outcome_unrecorded(attempt.fence_token)
                logger.warning(
                    "entry %s attempt %d failed and its failure could not be recorded (%s); "
                    "the next heartbeat hands it back to the operator",
                    entry_id,
                    attempt.attempt,
                    unrecorded,
                )
                raise error from None
            logger.warning(
                "entry %s attempt %d failed (%s); ledger state now %s",
                entry_id,
                attempt.attempt,
                type(error).__name__,
                state or "unchanged: the lease was lost",
            )
            raise
        finally:
            _current_attempt.reset(token)
        if not current.recorded:
            # Marked succeeded in a batch by the next heartbeat (see ``ledger._MARK_FINISHED``):
            # the fence check stays the only ledger statement a task costs.
            _incarnation.body_succeeded(attempt.fence_token)
        return result

    def _start(
        self, *, entry_id: str, fence_token: str
    ) -> tuple[ledger.RunningAttempt | None, uuid.UUID]:
        """The fence check under this process's live incarnation (and that incarnation). A
        refusal caused by the incarnation itself (ended, or not renewed in time) registers
        again and asks once more, so a valid delivery is never dropped for it."""
        for _ in range(2):
            incarnation = _incarnation.ready_for_a_body()
            attempt: ledger.RunningAttempt | None = _ledger_call(
                "checking the fence token",
                ledger.start_attempt,
                fence_token=fence_token,
                entry_id=entry_id,
                worker=worker_name(),
                incarnation=incarnation,
                heartbeat_timeout_seconds=_incarnation.timeout_seconds,
            )
            if attempt is not None or _ledger_call(
                "checking the worker incarnation",
                ledger.incarnation_is_live,
                incarnation=incarnation,
            ):
                return attempt, incarnation
            _incarnation.register_again(instead_of=incarnation)
        return None, incarnation


def _record_unknown_task(
    sender: Any = None, name: str | None = None, id: str | None = None, **_: Any
) -> None:
    """Charge an attempt to our entry whose message named a task this worker lacks."""
    dsn = _ledger_connection.dsn()
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
            retry = ledger.retry_rules(conn, policy_key=attempt.policy_key)
            decision = backoff.after_failure(attempt=attempt.attempt, retry=retry)
            ledger.record_failure(
                conn,
                fence_token=attempt.fence_token,
                error=ledger.sanitize_error(error, secrets=_secrets()),
                retry_in_seconds=decision.delay_seconds
                if isinstance(decision, backoff.RetryLater)
                else None,
            )
    except (ledger.DatabaseUnavailable, psycopg.Error) as failure:
        logger.error("could not record unknown task %r in the ledger: %s", name, failure)


celery.signals.task_unknown.connect(_record_unknown_task, weak=False)


def _hand_over_finished(**_: Any) -> None:
    _incarnation.hand_over_finished()


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
    if not any(isinstance(task, ReconciledTask) for task in tasks.values()):
        return
    if _ledger_connection.dsn():
        return
    message = (
        f"{DSN_ENVIRONMENT_VARIABLE} is not set: this worker runs ReconciledTask tasks, which "
        "need the DSN of the database holding the ledger (the same database as the entries "
        "table) — set it in the worker's environment, e.g. from the Secret the policy's "
        "spec.source.databaseSecretRef names"
    )
    logger.critical("%s", message)
    raise SystemExit(message)  # a plain exception would be logged and the worker would go on


celery.signals.worker_init.connect(_refuse_to_start_without_the_ledger, weak=False)


_guardian: subprocess.Popen[bytes] | None = None


def _start_guardian(sender: Any = None, **_: Any) -> None:
    """Start this worker's guardian (``guardian``): the party that stops a body process
    which cannot stop itself. Its run directory reaches the pool's processes through the
    environment they inherit."""
    app = getattr(sender, "app", None)
    tasks = getattr(app, "tasks", {}) if app is not None else {}
    dsn = _ledger_connection.dsn()
    if not dsn or not any(isinstance(task, ReconciledTask) for task in tasks.values()):
        return
    pid = os.getpid()
    directory = ticks.run_root() / f"worker-{pid}-{identity.process_start_ticks(pid) or 0}"
    shutil.rmtree(directory, ignore_errors=True)
    try:
        directory.mkdir(parents=True)
    except OSError as error:
        logger.error(
            "no guardian for this worker: cannot create its run directory %s (%s); set %s "
            "to a writable directory — until then a paused or GIL-bound body is stopped "
            "only by the operator's heartbeat timeout",
            directory,
            error,
            ticks.RUN_ROOT_VARIABLE,
        )
        return
    os.environ[ticks.RUN_DIRECTORY_VARIABLE] = str(directory)
    global _guardian
    _guardian = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery_reconciler_worker.guardian",
            "--parent",
            str(pid),
            "--directory",
            str(directory),
            "--heartbeat-timeout",
            str(heartbeat_timeout_seconds()),
        ],
        env={**os.environ, DSN_ENVIRONMENT_VARIABLE: dsn},
        stdin=subprocess.DEVNULL,
        # Its own process group: a signal to the worker's group (a terminal's Ctrl-C, a
        # SIGSTOP of the whole worker) does not reach the party that must act on it.
        process_group=0,
    )
    logger.info("guardian started for worker process %d (run directory %s)", pid, directory)


celery.signals.worker_init.connect(_start_guardian, weak=False)
