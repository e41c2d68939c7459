"""The ledger connection of a worker process, and running one ledger statement on it.

Every fence check and outcome a body's process records goes through ``get()`` of the current
``LedgerConnection``: by default one connection of our own per process, opened lazily after
the pool forks, to ``$CELERY_RECONCILER_DSN``; a framework may install its own
(``use_ledger_connection``, what ``celery_reconciler_worker.django`` does) so a body's writes
and the done mark share one transaction. ``ledger_call`` runs one statement and replaces a
connection that died; errors it reports name the server, never the DSN.

``ProcessLocalConnection`` is the fork-safe holder behind the worker's own connection,
public for task bodies that want one connection per worker process of their own (the demo's).
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
from collections.abc import Callable
from typing import Any, Protocol

import celery
import psycopg

from celery_reconciler_worker import identity, ledger

DSN_ENVIRONMENT_VARIABLE = "CELERY_RECONCILER_DSN"


class LedgerUnavailable(RuntimeError):
    """The worker cannot reach the ledger, so it must not run the body (it could not fence)."""


def required_dsn() -> str:
    """The ledger's DSN, or ``LedgerUnavailable`` saying what to set."""
    dsn = _ledger_connection.dsn()
    if not dsn:
        raise LedgerUnavailable(
            f"{DSN_ENVIRONMENT_VARIABLE} is not set: the worker needs the DSN of the database "
            "that holds the ledger (the same database as the entries table)"
        )
    return dsn


class ProcessLocalConnection:
    """A psycopg connection of this process alone, opened on first use: never one inherited
    across ``fork``.

    Celery's prefork pool forks its children from a parent that may have opened a
    connection already; a child using it would share one server session with its parent and
    siblings. ``get()`` notices a fork by the process id and opens a connection of the
    child's own; the inherited one is neither used nor closed in the child (closing it would
    end the parent's session), only kept referenced. ``connect`` opens one connection.

    ``per_thread=True`` keeps one connection per thread as well: the threads pool runs bodies
    side by side, and a body's ``fenced_transaction`` must own its connection's transaction.
    ``check_alive=True`` runs ``SELECT 1`` on a connection before handing it out again: a
    database restart leaves it open but dead, better found before a body starts than half-way
    through it (what Django's ``CONN_HEALTH_CHECKS`` does).
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        per_thread: bool = False,
        check_alive: bool = False,
    ) -> None:
        self._connect = connect
        self._check_alive = check_alive
        self._slot: Any = threading.local() if per_thread else types.SimpleNamespace()
        self._inherited: list[psycopg.Connection[Any]] = []

    def get(self) -> psycopg.Connection[Any]:
        """This process's (and thread's) connection, opened now if it has none that works."""
        connection = self._own()
        if connection is not None and self._check_alive:
            try:
                connection.execute("SELECT 1")
            except psycopg.Error:
                self.failed()
                connection = None
        if connection is None:
            connection = self._connect()
            self._slot.connection, self._slot.pid = connection, os.getpid()
        return connection

    def failed(self) -> None:
        """Drop the connection ``get`` returned (it raised), so the next ``get`` reconnects."""
        connection = self._own()
        self._slot.connection = None
        if connection is not None:
            with contextlib.suppress(psycopg.Error):
                connection.close()

    def _own(self) -> psycopg.Connection[Any] | None:
        """The open connection this process opened, if any; one inherited is set aside."""
        connection: psycopg.Connection[Any] | None = getattr(self._slot, "connection", None)
        if connection is not None and self._slot.pid != os.getpid():
            self._inherited.append(connection)
            self._slot.connection = connection = None
        if connection is not None and connection.closed:
            self._slot.connection = connection = None
        return connection


class _LedgerConnection:
    """The worker's own ledger connection: one per process, to ``$CELERY_RECONCILER_DSN``,
    with the schema made ready when it opens."""

    def __init__(self) -> None:
        self._connection = ProcessLocalConnection(self._open)

    def get(self) -> psycopg.Connection[Any]:
        return self._connection.get()

    def failed(self) -> None:
        """Drop a connection that raised, so the next task reconnects."""
        self._connection.failed()

    def dsn(self) -> str | None:
        return os.environ.get(DSN_ENVIRONMENT_VARIABLE)

    def _open(self) -> psycopg.Connection[Any]:
        dsn = required_dsn()
        try:
            connection = ledger.connect(
                dsn, application_name=f"celery-worker {identity.worker_name()}"
            )
            ledger.ensure_schema(connection)
        except ledger.DatabaseUnavailable as error:
            raise LedgerUnavailable(str(error)) from None
        except psycopg.errors.InsufficientPrivilege as error:
            connection.close()
            raise LedgerUnavailable(
                str(ledger.not_permitted(error, dsn=dsn, doing="preparing the ledger"))
            ) from None
        except psycopg.Error as error:
            raise LedgerUnavailable(
                str(ledger.unavailable(error, dsn=dsn, doing="preparing the ledger"))
            ) from None
        return connection


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


def secrets() -> tuple[str, ...]:
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
    return ledger.sanitize_error(text, secrets=secrets())


def ledger_call(doing: str, call: Any, **kwargs: Any) -> Any:
    """Run one ledger statement; a connection that died (say, the database restarted since
    the last task) is replaced and the statement tried once more. Each ledger statement is
    a single atomic UPDATE guarded by the fence token, so a second try can never apply it
    twice: at worst it finds the work already done and reports so."""
    try:
        return call(_ledger_connection.get(), **kwargs)
    except psycopg.errors.InsufficientPrivilege as error:
        raise _not_permitted(error, doing=doing) from None
    except (psycopg.OperationalError, psycopg.InterfaceError):
        _ledger_connection.failed()
    try:
        return call(_ledger_connection.get(), **kwargs)
    except psycopg.errors.InsufficientPrivilege as error:
        raise _not_permitted(error, doing=doing) from None
    except (psycopg.OperationalError, psycopg.InterfaceError) as error:
        _ledger_connection.failed()
        raise LedgerUnavailable(
            str(ledger.unavailable(error, dsn=required_dsn(), doing=doing))
        ) from None


def _not_permitted(error: BaseException, *, doing: str) -> LedgerUnavailable:
    """A missing GRANT is no reason to spend the delivery: like a database that is away, the
    body does not run and the delivery goes back to the queue, with what to grant."""
    return LedgerUnavailable(str(ledger.not_permitted(error, dsn=required_dsn(), doing=doing)))


def current() -> LedgerConnection:
    """The connection this process's ledger statements run on."""
    return _ledger_connection
