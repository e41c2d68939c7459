"""Django integration: the ledger reached through Django's own database connection.

A Django project already knows its database, and its task bodies write through the ORM. With
this module the fence check and the done mark run on Django's connection for the ``default``
database — the one the body's ORM uses, and no ``CELERY_RECONCILER_DSN`` to repeat — so
``fenced_atomic()``, a ``transaction.atomic()`` that also writes the done mark, commits the
body's ORM writes and the done mark together or not at all::

    from celery import shared_task
    from celery_reconciler_worker import django as reliable_django

    @shared_task(base=reliable_django.ReconciledTask, name="insights.tasks.extract_insights_task")
    def extract_insights_task(entry_id: str) -> None:
        entry = JournalEntry.objects.get(pk=int(entry_id))
        insights = derive_insights(entry.body)          # slow work outside the transaction
        with reliable_django.fenced_atomic():
            entry.insights, entry.insights_extracted = insights, True
            entry.save(update_fields=["insights", "insights_extracted"])

Importing this module makes Django's connection the ledger connection of the process
(``reliable.use_ledger_connection``): the task module that names the base class is imported
by every worker process that can run such a task, so no worker can miss it.

Django's settings decide the connection's life. Celery's Django fixup (active whenever
``DJANGO_SETTINGS_MODULE`` is set) drops the connections a prefork child inherited without
touching the parent's session; around each task it closed those ``CONN_MAX_AGE`` let go up
to Celery 5.5, and from 5.6 on it closes them all — unless ``CELERY_DB_REUSE_MAX`` is set,
which this module's ``recommended_settings`` does, and then ``keep_or_close_connections``
applies Django's rule itself. Each use here runs ``close_if_health_check_failed`` first, as
Django's own cursors do, which honours ``CONN_HEALTH_CHECKS``. The fence check therefore
runs on the connection the body will use.
Django connections are per thread, and the heartbeat thread must never wait behind a body's
statement, so the heartbeat (and the worker's main process, which must hold no connection a
child would inherit) opens a connection of its own — with the parameters Django builds from
``settings.DATABASES``, never a second setting. Django >= 4.2 with psycopg 3 is required:
the ledger speaks psycopg 3 on the same session.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import celery.signals
import psycopg
from django import db
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from psycopg import conninfo

from celery_reconciler_worker import ledger, reliable

ReconciledTask = reliable.ReconciledTask
FenceLost = reliable.FenceLost

# Celery's Django fixup closes every connection this many tasks apart once the setting is
# there (and, from Celery 5.6 on, before and after every task when it is not): far enough
# apart that CONN_MAX_AGE decides, through the handlers below.
DB_REUSE_MAX = 1_000_000


def recommended_settings(**kwargs: Any) -> dict[str, Any]:
    """``reliable.recommended_settings`` for a Django project, which also lets Django's own
    settings decide how long a pool process keeps its connection.

    Celery 5.6 and later close every Django connection before and after each task, whatever
    ``CONN_MAX_AGE`` says (Celery gave up ``close_if_unusable_or_obsolete`` there: a query
    cut short by a time limit can leave a connection Django thinks usable). Then each task
    opens a session, and the fence check and the done mark pay for it. With
    ``CELERY_DB_REUSE_MAX`` set, Celery leaves the connections alone and this module applies
    Django's rule for a request around each task instead (``keep_or_close_connections``):
    a connection is kept while ``CONN_MAX_AGE`` allows, and only when ``CONN_HEALTH_CHECKS``
    makes Django check it before reuse, which catches the connection a time limit broke.
    """
    return {**reliable.recommended_settings(**kwargs), "CELERY_DB_REUSE_MAX": DB_REUSE_MAX}


def keep_or_close_connections(sender: Any = None, **_: Any) -> None:
    """Around each task (``task_prerun`` and ``task_postrun``) of an app that keeps Celery
    from closing its connections (``CELERY_DB_REUSE_MAX``): close each Django connection that
    Django would not reuse for a new request, and every one it would not check first."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    app = getattr(sender, "app", None)
    if app is None or not app.conf.get("CELERY_DB_REUSE_MAX"):
        return  # Celery's fixup closes them (or, before Celery 5.6, applies this rule itself)
    for wrapper in db.connections.all(initialized_only=True):
        if wrapper.settings_dict.get("CONN_HEALTH_CHECKS"):
            wrapper.close_if_unusable_or_obsolete()
        else:
            wrapper.close()


celery.signals.task_prerun.connect(keep_or_close_connections, weak=False)
celery.signals.task_postrun.connect(keep_or_close_connections, weak=False)

# Keyword arguments of psycopg.connect that Django adds and that are no libpq parameters.
_NOT_CONNINFO = frozenset({"context", "cursor_factory", "prepare_threshold"})


class DjangoLedgerConnection:
    """The ledger on Django's connection for ``alias``, in the calling thread."""

    def __init__(self, alias: str = db.DEFAULT_DB_ALIAS) -> None:
        self.alias = alias
        self._schema_ready_in: int | None = None

    def get(self) -> psycopg.Connection[Any]:
        wrapper = db.connections[self.alias]
        if wrapper.in_atomic_block:
            # Our statements would join the caller's transaction, and a fence check or a
            # failure record would wait for a commit that may never come.
            raise RuntimeError(
                "the ledger runs outside transaction.atomic(): start or end the task outside "
                "it, and use fenced_atomic() for the body's writes"
            )
        if wrapper.vendor != "postgresql":
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}] is {wrapper.vendor}: the ledger lives in the "
                "PostgreSQL database of the entries"
            )
        try:
            wrapper.close_if_health_check_failed()
            wrapper.ensure_connection()
        except db.Error as error:
            raise reliable.LedgerUnavailable(
                str(ledger.unavailable(error, dsn=self.dsn() or "", doing="connecting"))
            ) from None
        connection = wrapper.connection
        if not isinstance(connection, psycopg.Connection):
            raise ImproperlyConfigured(
                "Django uses psycopg2 for this database: celery_reconciler_worker.django needs "
                "psycopg 3 (pip install 'psycopg[binary]'; Django >= 4.2 prefers it)"
            )
        if self._schema_ready_in != os.getpid():
            try:
                ledger.ensure_schema(connection)
            except psycopg.Error as error:
                raise reliable.LedgerUnavailable(
                    str(ledger.unavailable(error, dsn=self.dsn() or "", doing="preparing"))
                ) from None
            self._schema_ready_in = os.getpid()
        return connection

    def failed(self) -> None:
        # Closing a broken connection may raise in turn; either way Django opens a new one.
        with contextlib.suppress(db.Error, psycopg.Error):
            db.connections[self.alias].close()

    def dsn(self) -> str:
        params = db.connections[self.alias].get_connection_params()
        return conninfo.make_conninfo(
            **{
                key: value
                for key, value in params.items()
                if key not in _NOT_CONNINFO and value is not None
            }
        )


@contextlib.contextmanager
def fenced_atomic() -> Iterator[None]:
    """``transaction.atomic()`` on the default database that also writes the done mark.

    Inside a ``ReconciledTask`` body, outside any other ``atomic`` block: the ORM writes made
    in the block and the attempt's done mark commit in one transaction. The done mark locks
    the entry's ledger row and matches only while this attempt still owns it; if the
    operator has handed the entry to another attempt, everything rolls back and
    ``FenceLost`` ends the task quietly. Exactly-once effects for writes to this database.
    """
    wrapper = db.connections[db.DEFAULT_DB_ALIAS]
    if wrapper.in_atomic_block:
        raise RuntimeError(
            "fenced_atomic() must own the commit: inside another atomic block it would only be "
            "a savepoint, and the done mark would wait for a commit that may never come"
        )

    def connection() -> psycopg.Connection[Any]:
        raw = wrapper.connection
        if not isinstance(raw, psycopg.Connection):
            raise ImproperlyConfigured("celery_reconciler_worker.django needs psycopg 3")
        return raw

    with reliable.fenced_commit(
        transaction=transaction.atomic(using=db.DEFAULT_DB_ALIAS), connection=connection
    ):
        yield


reliable.use_ledger_connection(DjangoLedgerConnection())
