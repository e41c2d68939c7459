"""This worker process's incarnation: its registration in the ledger and its heartbeat.

Liveness is a fact about an incarnation — one life of one worker process — never about a
name. ``Incarnation`` registers lazily (the first body a process runs), renews itself and
the leases of its attempts from a heartbeat thread, hands over what its bodies finished, and
answers the watchdog (``watchdog``) whether its bodies must stop. ``current`` is this
process's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg

from celery_reconciler_worker import connection, identity, ledger, settings, ticks, watchdog

HEARTBEAT_TIMEOUT_VARIABLE = "CELERY_RECONCILER_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 20.0
# A heartbeat every fifth of the timeout: three can fail before the self-fence.
HEARTBEATS_PER_TIMEOUT = 5
# The watchdog kills the bodies this far into the timeout after the last renewal that got
# through was sent: the operator can end the incarnation on silence only after the whole
# timeout (database clock, from a ``heartbeat_at`` no earlier than the sending), and the
# quarter left covers the watchdog's period and its own lateness on a loaded node.
SELF_FENCE_TIMEOUT_FRACTION = 0.75

logger = logging.getLogger(__name__)


def heartbeat_timeout_seconds() -> float:
    return settings.seconds_from_environment(
        HEARTBEAT_TIMEOUT_VARIABLE,
        default=DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
        at_least=1.0,
        at_most=3600.0,
    )


def worker_identity() -> ledger.WorkerIdentity:
    pod_uid = os.environ.get(identity.POD_UID_VARIABLE) or None
    return ledger.WorkerIdentity(
        hostname=identity.worker_name(),
        pid=os.getpid(),
        pod_name=os.environ.get(identity.POD_NAME_VARIABLE) or None,
        pod_namespace=os.environ.get(identity.POD_NAMESPACE_VARIABLE) or None,
        pod_uid=pod_uid,
        container_id=identity.container_id(pod_uid),
        container_name=os.environ.get(identity.CONTAINER_NAME_VARIABLE) or None,
        container_started_at=identity.container_started_at(pod_uid),
    )


class Incarnation:
    """This process's life in the ledger: its id, its heartbeat and its self-fence.

    Registered lazily by the first body a process runs (after the pool forked it), so a
    prefork parent, which runs no bodies, never has one. Two daemon threads serve it:

    * the heartbeat renews it every ``timeout / HEARTBEATS_PER_TIMEOUT`` on a connection of
      its own (one statement however many bodies run, bounded by a statement and a lock
      timeout: ``settings.heartbeat_statement_timeout_seconds``), which also pushes the
      leases of the attempts it runs. It keeps its cadence when a heartbeat fails, so a
      slow database costs the heartbeats it fails, not the ones after;
    * the watchdog does no I/O at all: it publishes this process's tick for the guardian
      (``ticks``) and, while a body runs, if the last renewal that succeeded was *sent*
      more than ``SELF_FENCE_TIMEOUT_FRACTION`` of the timeout ago — or the operator has
      ended the incarnation, or a body still runs under an incarnation this process has
      left — it kills the process. A hung connection cannot delay it; a database slow for
      less than that costs no body.

    That watchdog is the fast path. A process that cannot run its threads at all (paused, or
    a body holding the GIL) stops ticking, and its guardian kills it from outside
    (``guardian``).

    The operator ends an incarnation only after ``timeout`` without a heartbeat (both
    measured on the database's clock from the same rows), or on proof that its process is
    gone, so a worker that cannot renew has stopped its bodies at least a quarter of its
    timeout before anyone may re-dispatch them on silence.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self.id: uuid.UUID | None = None
        self.timeout_seconds = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
        self.statement_timeout_seconds = self.timeout_seconds / HEARTBEATS_PER_TIMEOUT
        self.lock_timeout_seconds = self.statement_timeout_seconds / 2
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
        """Too old to start a body under: the fence check's own rule (``ledger``)."""
        return time.monotonic() - self._renewed_at > self.timeout_seconds / 2

    def _fence_at_risk(self) -> bool:
        """Close enough to the moment the operator may end the incarnation on silence that
        its bodies must die now."""
        silent_seconds = time.monotonic() - self._renewed_at
        return silent_seconds > self.timeout_seconds * SELF_FENCE_TIMEOUT_FRACTION

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
            if connection.ledger_call(
                "renewing the heartbeat", ledger.heartbeat, incarnation=self.id
            ):
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
            watchdog.stop_own_bodies()
        self.timeout_seconds = heartbeat_timeout_seconds()
        # Read here, where a wrong value fails the body that registers (saying which
        # variable), not the heartbeat thread.
        self.statement_timeout_seconds = settings.heartbeat_statement_timeout_seconds(
            heartbeat_timeout_seconds=self.timeout_seconds
        )
        self.lock_timeout_seconds = settings.heartbeat_lock_timeout_seconds(
            heartbeat_timeout_seconds=self.timeout_seconds
        )
        sent = time.monotonic()
        incarnation: uuid.UUID = connection.ledger_call(
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
            connection.ledger_call(
                "handing over finished bodies",
                ledger.heartbeat,
                incarnation=incarnation,
                unrecorded=unrecorded,
                finished=finished,
            )
        except connection.LedgerUnavailable as error:
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
        try:
            self._ticks = ticks.publisher_for_this_process()
        except OSError as error:
            logger.error("no tick for the guardian (it cannot stop this process): %s", error)
        threading.Thread(
            target=self._heartbeat_forever, name="ledger-heartbeat", daemon=True
        ).start()
        watchdog.start(self.must_stop)

    def _heartbeat_forever(self) -> None:
        own_connection = None
        next_beat = time.monotonic()
        while True:
            period_seconds = self.timeout_seconds / HEARTBEATS_PER_TIMEOUT
            # On a cadence, not a sleep after each try: a heartbeat that waited for its
            # timeouts does not push the next one back.
            next_beat = max(next_beat + period_seconds, time.monotonic())
            time.sleep(max(0.0, next_beat - time.monotonic()))
            with self._lock:
                incarnation, unrecorded = self.id, tuple(self._unrecorded)
                finished = tuple(self._finished)
            if incarnation is None or (self._ended and not finished and not unrecorded):
                continue  # an ended incarnation still hands over what its bodies finished
            sent = time.monotonic()
            try:
                if own_connection is None or own_connection.closed:
                    # A slow database fails one heartbeat, which the next one retries,
                    # instead of holding the thread until the watchdog's deadline.
                    own_connection = ledger.connect(
                        connection.required_dsn(),
                        application_name=f"celery-worker {identity.worker_name()} heartbeat",
                        connect_timeout_seconds=max(1, int(self.timeout_seconds / 4)),
                        tcp_user_timeout_seconds=self.timeout_seconds / 2,
                        statement_timeout_seconds=self.statement_timeout_seconds,
                        lock_timeout_seconds=self.lock_timeout_seconds,
                    )
                alive = ledger.heartbeat(
                    own_connection,
                    incarnation=incarnation,
                    unrecorded=unrecorded,
                    finished=finished,
                )
            except (
                ledger.DatabaseUnavailable,
                connection.LedgerUnavailable,
                psycopg.Error,
            ) as error:
                logger.warning("heartbeat of incarnation %s failed: %s", incarnation, error)
                if own_connection is not None:
                    own_connection.close()
                own_connection = None
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

    def must_stop(self) -> bool:
        """The watchdog's question, every period: publishes this process's tick, and says
        whether its bodies must die — they run while the incarnation is ended, or has not
        been renewed for ``SELF_FENCE_TIMEOUT_FRACTION`` of its timeout, or under an
        incarnation this process replaced."""
        with self._lock:
            self._tick()
            return bool(self._running) and (
                self._ended or self._fence_at_risk() or any(i != self.id for i in self._running)
            )


current = Incarnation()
