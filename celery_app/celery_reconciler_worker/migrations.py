"""Applying the ledger's schema versions online: while workers run bodies on it.

A worker's heartbeat must get through within its lock timeout, or after a heartbeat
timeout without one its bodies are killed (``incarnation``, ``watchdog``). So a migration
must never hold a lock that heartbeats, fence checks or done marks need for longer than a
fraction of that — whatever the size of the ledger's history. Hence:

* each version runs on its own; its plain statements (DDL) in short transactions with
  ``lock_timeout = MIGRATION_LOCK_TIMEOUT_SECONDS``: a DDL lock that is not granted at once
  is given up (so nobody queues behind it for longer) and tried again, with a growing,
  jittered pause, for up to ``MIGRATION_PATIENCE_SECONDS``;
* indexes on tables that hold history are built ``CONCURRENTLY`` (``ConcurrentIndex``),
  outside any transaction: no lock that blocks writes; a build that failed leaves an
  invalid index, which the next try drops first;
* data changes are made in batches (``Backfill``), each its own transaction;
* a version is recorded in ``schema_migrations`` only after all its steps, and every step
  is idempotent (``IF NOT EXISTS``, a backfill whose predicate excludes rows it already
  changed), so a migration that died half-way is simply run again.

Two processes never migrate at once: a session-level advisory lock is held across the
versions (a transaction-level one would end with the first version's transaction).

A connection that is not in autocommit mode (Django's inside ``atomic``) cannot build an
index concurrently nor commit between batches: there every version runs inside that
transaction as one unit, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql

# How long a migration's statement may wait for a lock before it gives up and tries again:
# the longest a heartbeat queued behind it can wait because of it. Well under the
# heartbeat's own lock timeout (half of a fifth of the heartbeat timeout: 2 s by default).
MIGRATION_LOCK_TIMEOUT_SECONDS = 0.2
# How long a migration keeps trying for a lock before it fails (and is retried by the next
# connection of an operator or a worker).
MIGRATION_PATIENCE_SECONDS = 600.0
BACKFILL_BATCH_ROWS = 5000

_T = TypeVar("_T")

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Longest:
    """The longest transaction a migration ran (what a writer could have waited behind)."""

    seconds: float = 0.0
    what: str = "none"

    def timed(self, attempt: Callable[[], _T], *, what: str) -> Callable[[], _T]:
        def run() -> _T:
            started = time.monotonic()
            try:
                return attempt()
            finally:
                elapsed = time.monotonic() - started
                if elapsed > self.seconds:
                    self.seconds, self.what = elapsed, what

        return run


@dataclasses.dataclass(frozen=True)
class Backfill:
    """A data change made in batches, each in a transaction of its own.

    ``statement`` binds ``%(batch)s`` (rows per batch) and ``%(after)s`` (the last key the
    previous batch returned; NULL at first) and returns one row: ``(rows changed, last
    key)``. It is repeated until a batch changes no row and returns no key."""

    statement: sql.Composed


@dataclasses.dataclass(frozen=True)
class ConcurrentIndex:
    """``CREATE INDEX CONCURRENTLY IF NOT EXISTS <name> ON <definition>``."""

    schema: str
    name: str
    definition: sql.Composed


Step = sql.Composed | Backfill | ConcurrentIndex
Migration = tuple[int, tuple[Step, ...]]


def apply(
    conn: psycopg.Connection[Any],
    *,
    migrations: Sequence[Migration],
    lock_id: int,
    prepare: Sequence[sql.Composed],
    applied: Callable[[], set[int]],
    record: sql.Composed,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Apply each version of ``migrations`` not ``applied()`` yet, in order, recording each
    with ``record`` (binds the version). ``prepare`` (idempotent) runs first, under the lock.
    """
    if not conn.autocommit:
        _apply_in_one_transaction(
            conn, migrations=migrations, lock_id=lock_id, prepare=prepare, applied=applied,
            record=record,
        )  # fmt: skip
        return
    with _session(conn, statement_timeout="0", lock_timeout="0"):
        _take_lock(conn, lock_id=lock_id, sleep=sleep)
        try:
            _retrying(lambda: _run(conn, prepare), sleep=sleep)
            done = applied()
            started = time.monotonic()
            longest = _Longest()
            versions = [version for version, _ in migrations if version not in done]
            for version, steps in migrations:
                if version in versions:
                    _apply_version(
                        conn, version, steps, record=record, sleep=sleep, longest=longest
                    )
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [lock_id])
    if not versions:
        return  # another process migrated it while this one waited
    logger.info(
        "ledger schema migrated to version %d (%d versions) in %.1f s; its longest "
        "transaction took %.3f s (%s)",
        versions[-1],
        len(versions),
        time.monotonic() - started,
        longest.seconds,
        longest.what,
    )


# How often a process waiting for another's migration asks for the lock again.
LOCK_POLL_SECONDS = 0.2


def _take_lock(
    conn: psycopg.Connection[Any], *, lock_id: int, sleep: Callable[[float], None]
) -> None:
    """The session's advisory lock, asked for again and again rather than waited for: a
    statement waiting for it would be a transaction that the migrator's
    ``CREATE INDEX CONCURRENTLY`` must wait for in turn — a deadlock."""
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", [lock_id]).fetchone()
        if row is not None and row[0]:
            return
        sleep(LOCK_POLL_SECONDS)


def _apply_version(
    conn: psycopg.Connection[Any],
    version: int,
    steps: Sequence[Step],
    *,
    record: sql.Composed,
    sleep: Callable[[float], None],
    longest: _Longest,
) -> None:
    plain: list[sql.Composed] = []
    for step in steps:
        if isinstance(step, sql.Composed):
            plain.append(step)
            continue
        if plain:
            _retrying(
                longest.timed(
                    functools.partial(_run, conn, tuple(plain)), what=f"version {version}'s DDL"
                ),
                sleep=sleep,
            )
            plain = []
        if isinstance(step, Backfill):
            _backfill(
                conn, step, sleep=sleep, longest=longest, what=f"a batch of version {version}"
            )
        else:
            _retrying(functools.partial(_build_concurrently, conn, step), sleep=sleep)
    _retrying(
        longest.timed(
            functools.partial(_run, conn, tuple(plain), record=record, version=version),
            what=f"version {version}'s last transaction",
        ),
        sleep=sleep,
    )


def _run(
    conn: psycopg.Connection[Any],
    statements: Sequence[sql.Composed],
    *,
    record: sql.Composed | None = None,
    version: int | None = None,
) -> None:
    with conn.transaction():
        conn.execute(_lock_timeout())
        for statement in statements:
            conn.execute(statement)
        if record is not None:
            conn.execute(record, [version])


def _lock_timeout() -> sql.Composed:
    milliseconds = max(1, round(MIGRATION_LOCK_TIMEOUT_SECONDS * 1000))
    return sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(milliseconds))


def _backfill(
    conn: psycopg.Connection[Any],
    step: Backfill,
    *,
    sleep: Callable[[float], None],
    longest: _Longest,
    what: str,
) -> None:
    after: Any = None
    while True:
        changed, after = _retrying(
            longest.timed(functools.partial(_batch, conn, step, after), what=what), sleep=sleep
        )
        if not changed and after is None:
            return


def _batch(conn: psycopg.Connection[Any], step: Backfill, after: Any) -> tuple[int, Any]:
    with conn.transaction():
        conn.execute(_lock_timeout())
        return _batch_in_transaction(conn, step, after)


def _batch_in_transaction(
    conn: psycopg.Connection[Any], step: Backfill, after: Any
) -> tuple[int, Any]:
    row = conn.execute(step.statement, {"batch": BACKFILL_BATCH_ROWS, "after": after}).fetchone()
    return (0, None) if row is None else (int(row[0] or 0), row[1])


def _build_concurrently(conn: psycopg.Connection[Any], index: ConcurrentIndex) -> None:
    """Build without blocking writes. It waits for transactions older than itself (a body's
    fenced transaction, say) but makes nobody wait, so it runs with no lock timeout."""
    qualified = sql.Identifier(index.schema, index.name)
    invalid = conn.execute(
        "SELECT NOT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        [f"{index.schema}.{index.name}"],
    ).fetchone()
    if invalid is not None and invalid[0]:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(qualified))
    conn.execute(
        sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {}").format(
            sql.Identifier(index.name), index.definition
        )
    )


def _retrying(attempt: Callable[[], _T], *, sleep: Callable[[float], None]) -> _T:
    """``attempt()``, tried again after a lock timeout or a deadlock, with a growing,
    jittered pause, for up to ``MIGRATION_PATIENCE_SECONDS``."""
    deadline = time.monotonic() + MIGRATION_PATIENCE_SECONDS
    pause = 0.05
    while True:
        try:
            return attempt()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            if time.monotonic() + pause > deadline:
                raise
        sleep(pause * (0.5 + random.random()))
        pause = min(2.0, pause * 2)


@contextlib.contextmanager
def _session(conn: psycopg.Connection[Any], **settings: str) -> Iterator[None]:
    """The session's ``settings`` for the block, then back to what they were."""
    before = {
        name: conn.execute("SELECT current_setting(%s)", [name]).fetchone() for name in settings
    }
    for name, value in settings.items():
        conn.execute("SELECT set_config(%s, %s, false)", [name, value])
    try:
        yield
    finally:
        for name, row in before.items():
            if row is not None and not conn.closed:
                conn.execute("SELECT set_config(%s, %s, false)", [name, row[0]])


def _apply_in_one_transaction(
    conn: psycopg.Connection[Any],
    *,
    migrations: Sequence[Migration],
    lock_id: int,
    prepare: Sequence[sql.Composed],
    applied: Callable[[], set[int]],
    record: sql.Composed,
) -> None:
    with conn.transaction():
        # A migration may read a whole ledger once: the session's statement timeout is for
        # its own statements, not for this.
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id])
        for statement in prepare:
            conn.execute(statement)
        done = applied()
        for version, steps in migrations:
            if version in done:
                continue
            for step in steps:
                if isinstance(step, sql.Composed):
                    conn.execute(step)
                elif isinstance(step, Backfill):
                    after: Any = None
                    while True:
                        changed, after = _batch_in_transaction(conn, step, after)
                        if not changed and after is None:
                            break
                else:
                    conn.execute(
                        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {}").format(
                            sql.Identifier(step.name), step.definition
                        )
                    )
            conn.execute(record, [version])
