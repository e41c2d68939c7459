"""``reliable.ProcessLocalConnection``, the one fork-safe connection holder (the worker's
ledger connection and the demo's body connection both use it), against a real PostgreSQL:
a forked child opens a session of its own and leaves its parent's alone; threads get one
each when asked; a connection the server ended is replaced before it is handed out."""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg
import pytest

from celery_reconciler_worker import reliable

pytestmark = pytest.mark.integration


def backend(connection: psycopg.Connection[Any]) -> int:
    row = connection.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def holder(dsn: str, **options: bool) -> reliable.ProcessLocalConnection:
    return reliable.ProcessLocalConnection(lambda: psycopg.connect(dsn, autocommit=True), **options)


def test_a_forked_child_opens_its_own_session_and_leaves_its_parents_alone(
    database_dsn: str,
) -> None:
    connections = holder(database_dsn)
    parent = connections.get()
    parent_backend = backend(parent)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.write(write_end, str(backend(connections.get())).encode())
            connections.failed()  # closes the child's own session, never the parent's
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    child_backend = int(os.read(read_end, 64))
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend != parent_backend
    assert connections.get() is parent and backend(parent) == parent_backend
    connections.failed()
    assert parent.closed


def test_threads_get_a_connection_each_and_a_dead_one_is_replaced_before_use(
    database_dsn: str,
) -> None:
    connections = holder(database_dsn, per_thread=True, check_alive=True)
    mine = connections.get()
    theirs: list[int] = []
    thread = threading.Thread(target=lambda: theirs.append(backend(connections.get())))
    thread.start()
    thread.join()
    assert theirs and theirs[0] != backend(mine)
    with psycopg.connect(database_dsn, autocommit=True) as administrator:
        administrator.execute("SELECT pg_terminate_backend(%s, 10000)", [backend(mine)])
    again = connections.get()
    assert again is not mine and backend(again) != theirs[0]
    assert connections.get() is again
    connections.failed()
