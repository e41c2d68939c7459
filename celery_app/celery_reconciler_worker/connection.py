"""The ledger connection of a worker process, and running one ledger statement on it.

Every fence check and outcome a body's process records goes through ``get()`` of the current
``LedgerConnection``: by default one connection of our own per process, opened lazily after
the pool forks, to ``$CELERY_RECONCILER_DSN``; a framework may install its own
(``use_ledger_connection``, what ``celery_reconciler_worker.django`` does) so a body's writes
and the done mark share one transaction. ``ledger_call`` runs one statement and replaces a
connection that died; errors it reports name the server, never the DSN.
"""

from __future__ import annotations

import os
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
