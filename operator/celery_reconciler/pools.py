"""PostgreSQL connections shared by every policy of one database, within a bound.

A connection per policy does not scale: PostgreSQL's default ``max_connections`` is 100,
and the operator's connections compete with the workers' for those slots (a worker that
cannot connect cannot run a task). Here every policy whose Secret resolves to the same DSN
borrows from one ``SharedDatabase``, which never holds more than the operator's bound
(``--max-database-connections``, ``CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS``, chart
value ``operator.maxDatabaseConnections``) open to that database.

The bound is split in two roles, each its own set of slots: most for sweeps and status
reads, a reserve for the pod-restart hook. A rescue is what turns a killed worker's work
around in seconds; it must not queue behind a few hundred routine sweeps. Rescues also run
in threads of their own (``run_rescue``) so that sweeps waiting for a slot cannot occupy
every thread either.

A borrowed connection stays with its borrower for the whole ``session``: a sweep claims
and publishes on one connection (its transactions, ``SET LOCAL`` and transaction-scoped
advisory locks all live and die within it). The operator takes no session-level advisory
lock and changes no session setting after connecting, so a connection returned idle is as
good as a fresh one; one returned inside a transaction, or broken, is closed instead.

Why not ``psycopg_pool``: its connections are opened by a background thread, so a borrower
who waits while the server refuses connections only ever sees ``PoolTimeout`` after the
full wait — "the database is down", "its DSN is wrong" and "its connection slots are
used up" would all read as "the pool is busy", late. Here the borrower opens a missing
connection itself and meets the server's own answer at once (``ledger.connect``:
``DatabaseUnavailable``, ``TooManyConnections``), while waiting for a slot is bounded by a
semaphore and, when that wait runs out, is its own reason: ``PoolExhausted``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg

from celery_reconciler import ledger, shared_by_key

MAX_CONNECTIONS_ENV = "CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS"
DEFAULT_MAX_CONNECTIONS = 20
# Waiting for a slot is normal with hundreds of policies (a sweep holds one for tens of
# milliseconds); only a wait this long says the bound is too small for the work.
WAIT_SECONDS = 120.0
# A connection idle this long is closed: after a burst (the start-up sweeps of every policy)
# the operator shrinks back to what its steady sweeps use.
IDLE_SECONDS = 300.0
SWEEP_APPLICATION_NAME = "celery-reconciler"
RESCUE_APPLICATION_NAME = "celery-reconciler-rescue"

_T = TypeVar("_T")


class PoolExhausted(ledger.DatabaseUnavailable):
    """Every connection the operator may open to the database was busy for the whole wait."""


def max_connections_from_env(environ: dict[str, str] | None = None) -> int:
    raw = (os.environ if environ is None else environ).get(MAX_CONNECTIONS_ENV, "")
    if not raw.strip():
        return DEFAULT_MAX_CONNECTIONS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_CONNECTIONS_ENV} must be a whole number, not {raw!r}") from None
    check_max_connections(value)
    return value


def check_max_connections(value: int) -> None:
    if value < 2:
        raise ValueError(
            "the operator needs at least 2 connections per database: one for sweeps, "
            f"one kept for the pod-restart hook (got {value})"
        )


@dataclasses.dataclass(frozen=True)
class Split:
    sweep: int
    rescue: int


def split(max_connections: int) -> Split:
    """A fifth of the bound (at least one) is kept for rescues, the rest serves sweeps."""
    check_max_connections(max_connections)
    rescue = max(1, max_connections // 5)
    return Split(sweep=max_connections - rescue, rescue=rescue)


_settings_lock = threading.Lock()
_max_connections = DEFAULT_MAX_CONNECTIONS
_rescue_executor: concurrent.futures.ThreadPoolExecutor | None = None


def configure(*, max_connections: int) -> None:
    """The per-database bound for pools opened from now on (the operator sets it at start)."""
    global _max_connections
    check_max_connections(max_connections)
    with _settings_lock:
        _max_connections = max_connections


def max_connections() -> int:
    return _max_connections


class _Slots:
    """Connections of one role to one database: at most ``size`` open, idle ones reused."""

    def __init__(
        self, dsn: str, *, size: int, bound: int, application_name: str, role: str
    ) -> None:
        self._dsn = dsn
        self.size = size
        self._bound = bound
        self._application_name = application_name
        self._role = role
        self._free = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._closed = False

    @contextlib.contextmanager
    def borrow(self, *, doing: str) -> Iterator[psycopg.Connection[Any]]:
        if not self._free.acquire(timeout=WAIT_SECONDS):
            raise PoolExhausted(
                f"all {self.size} connections the operator may open to "
                f"{ledger.describe_dsn(self._dsn)} for {self._role} stayed busy for "
                f"{WAIT_SECONDS:g}s while {doing}: more policies share this database than "
                f"the bound serves — raise {MAX_CONNECTIONS_ENV} (chart value "
                f"operator.maxDatabaseConnections, now {self._bound}) within the "
                "server's max_connections, or lengthen the policies' sweepInterval; nothing "
                "was lost, the next sweep retries"
            )
        try:
            conn = self._take()
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            self._free.release()

    def _take(self) -> psycopg.Connection[Any]:
        with self._lock:
            while self._idle:
                conn, _ = self._idle.pop()  # the warmest: the others may age out
                if not conn.closed:
                    return conn
        conn = ledger.connect(
            self._dsn,
            application_name=self._application_name,
            statement_timeout_seconds=ledger.OPERATOR_STATEMENT_TIMEOUT_SECONDS,
            lock_timeout_seconds=ledger.OPERATOR_LOCK_TIMEOUT_SECONDS,
        )
        try:
            ledger.ensure_schema(conn)
        except psycopg.Error as error:
            conn.close()
            raise ledger.database_failure(
                error, dsn=self._dsn, doing="creating the ledger schema"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        """Keep a connection that is idle and whole, whether its borrower failed or not (a
        statement the server rejected leaves it usable); close any other."""
        idle = psycopg.pq.TransactionStatus.IDLE
        now = time.monotonic()
        keep = not conn.closed and conn.info.transaction_status == idle
        expired: list[psycopg.Connection[Any]] = []
        with self._lock:
            if keep and not self._closed:
                self._idle.append((conn, now))
            else:
                expired.append(conn)
            fresh = [(c, t) for c, t in self._idle if now - t < IDLE_SECONDS]
            expired += [c for c, t in self._idle if now - t >= IDLE_SECONDS]
            self._idle = fresh
        for stale in expired:
            with contextlib.suppress(Exception):
                stale.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            with contextlib.suppress(Exception):
                conn.close()


class PooledDatabase:
    """``reconcile.Sessions`` over shared slots: each ``session`` borrows a connection for
    its duration. The DSN is kept private and never appears in ``repr``."""

    def __init__(self, slots: _Slots, *, dsn: str) -> None:
        self._slots = slots
        self._dsn = dsn

    def __repr__(self) -> str:
        return f"PooledDatabase({ledger.describe_dsn(self._dsn)})"

    @contextlib.contextmanager
    def session(self, *, doing: str) -> Iterator[psycopg.Connection[Any]]:
        with self._slots.borrow(doing=doing) as conn:
            try:
                yield conn
            except psycopg.Error as error:
                raise self.failure(error, doing=doing) from None

    def failure(self, error: psycopg.Error, *, doing: str) -> Exception:
        return ledger.database_failure(error, dsn=self._dsn, doing=doing)

    def close(self) -> None:
        self._slots.close()


class SharedDatabase:
    """The slots of one database, for as long as some policy uses it (``attach``)."""

    def __init__(self, dsn: str, *, max_connections: int) -> None:
        parts = split(max_connections)
        self.dsn = dsn
        self.max_connections = max_connections
        self.sweeps = PooledDatabase(
            _Slots(
                dsn,
                size=parts.sweep,
                bound=max_connections,
                application_name=SWEEP_APPLICATION_NAME,
                role="sweeps and status reads",
            ),
            dsn=dsn,
        )
        self.rescues = PooledDatabase(
            _Slots(
                dsn,
                size=parts.rescue,
                bound=max_connections,
                application_name=RESCUE_APPLICATION_NAME,
                role="the pod-restart hook",
            ),
            dsn=dsn,
        )

    def __repr__(self) -> str:
        return f"SharedDatabase({ledger.describe_dsn(self.dsn)})"

    def close(self) -> None:
        self.sweeps.close()
        self.rescues.close()


_shared: shared_by_key.SharedByKey[str, SharedDatabase] = shared_by_key.SharedByKey(
    close_value=SharedDatabase.close
)


def attach(dsn: str) -> SharedDatabase:
    """The shared connections of ``dsn``; every ``attach`` is matched by one ``detach``."""
    return _shared.attach(
        dsn, open_value=lambda: SharedDatabase(dsn, max_connections=_max_connections)
    )


def detach(shared: SharedDatabase) -> None:
    _shared.detach(shared.dsn, shared)


def run_rescue(function: Callable[[], _T]) -> concurrent.futures.Future[_T]:
    """Run ``function`` in the rescue threads, which no sweep waiting for a slot can take."""
    global _rescue_executor
    with _settings_lock:
        if _rescue_executor is None:
            _rescue_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=split(_max_connections).rescue, thread_name_prefix="rescue"
            )
        executor = _rescue_executor
    return executor.submit(function)
