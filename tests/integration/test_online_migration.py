"""A schema migration on a ledger with a large history never stops a worker's bodies (issue 25).

A worker whose heartbeat cannot get through for a heartbeat timeout kills its own bodies
(``celery_reconciler_worker.watchdog``), and every running entry is then charged an attempt.
A migration that holds a lock heartbeats need for as long as its history takes to rewrite
would do exactly that. Real PostgreSQL, a real ``celery worker`` running bodies throughout,
the real ``reconcile_once`` as the operator, and a real migration run by the code that
migrates every ledger (``ledger.ensure_schema``):

* the ledger is at this release's schema — the release before the migration — with
  ``HISTORY`` finished attempts (and as many succeeded entries) of another policy;
* the next release's migration is the kind this project's own migrations are (3 and 4): a
  column added to ``entries`` and to ``attempts``, the history's rows backfilled, an index
  built over them;
* it runs while the worker's bodies run (new entries keep joining, ``Feeder``, so bodies
  run for as long as it does); afterwards: no body was killed, no attempt lost or doubled,
  the backfill complete. The longest table lock that blocks writers the migration held
  (sampled from ``pg_locks``) and its longest transaction (its own log) are printed.

``HISTORY`` is 300,000 in ``make test``: 1M took 143 s to seed on the loaded 2-core test
machine, and the statements do not change with the size. ``make bench`` runs this same test
at the issue's 1M finished attempts (``ONLINE_MIGRATION_HISTORY``), so the size the promise
is made for is run too, where a long run costs no one's verdict.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import psycopg
import pytest
from fencing_support import (
    BodyWatch,
    Sweeper,
    lost_attempts,
    overlapping,
    successes_by_entry,
    timed_runs,
)
from psycopg import sql
from reconcile_support import WorkerFactory, make_policy, pending_count, wait_for

from celery_app.demo import schema
from celery_reconciler_worker import ledger, migrations

pytestmark = pytest.mark.integration

HISTORY = int(os.environ.get("ONLINE_MIGRATION_HISTORY", "300000"))
ENTRIES = 100  # at first; more join while the migration runs (``Feeder``)
BODY_SECONDS = 0.2
HEARTBEAT_TIMEOUT_SECONDS = 6.0

NEXT_RELEASE: migrations.Migration = (
    ledger.SCHEMA_VERSION + 1,
    (
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS seconds double precision").format(
            ledger.ATTEMPTS
        ),
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS note text").format(ledger.ENTRIES),
        migrations.Backfill(
            sql.SQL(
                """
                WITH batch AS (
                    SELECT id FROM {attempts} WHERE id > coalesce(%(after)s::bigint, 0)
                    ORDER BY id LIMIT %(batch)s
                ), changed AS (
                    UPDATE {attempts} a
                    SET seconds = EXTRACT(EPOCH FROM a.finished_at - a.started_at)
                    FROM batch WHERE a.id = batch.id AND a.seconds IS NULL
                      AND a.finished_at IS NOT NULL
                    RETURNING 1
                )
                SELECT (SELECT count(*) FROM changed), (SELECT max(id) FROM batch)
                """
            ).format(attempts=ledger.ATTEMPTS)
        ),
        migrations.ConcurrentIndex(
            ledger.SCHEMA,
            "attempts_by_seconds",
            sql.SQL("{} (policy_key, seconds)").format(ledger.ATTEMPTS),
        ),
    ),
)


def seed_history(conn: psycopg.Connection[Any], *, attempts: int) -> float:
    """``attempts`` finished attempts, each of its own succeeded entry; seconds it took."""
    started = time.monotonic()
    conn.execute(
        sql.SQL(
            """
            INSERT INTO {entries} (policy_key, entry_id, state, attempt, fence_token,
                dispatched_at, started_at, finished_at, counted)
            SELECT 'history/old', n::text, 'succeeded', 1, gen_random_uuid(),
                now() - interval '2 days', now() - interval '2 days',
                now() - interval '2 days' + make_interval(secs => n %% 60), true
            FROM generate_series(1, %(count)s) AS n
            """
        ).format(entries=ledger.ENTRIES),
        {"count": attempts},
    )
    conn.execute(
        sql.SQL(
            """
            INSERT INTO {attempts} (policy_key, entry_id, attempt, fence_token, worker,
                outcome, dispatched_at, started_at, finished_at)
            SELECT policy_key, entry_id, 1, fence_token, 'old-worker', 'succeeded',
                dispatched_at, started_at, finished_at
            FROM {entries} WHERE policy_key = 'history/old'
            """
        ).format(attempts=ledger.ATTEMPTS, entries=ledger.ENTRIES)
    )
    conn.execute(
        sql.SQL("INSERT INTO {} (policy_key, succeeded) VALUES ('history/old', %s)").format(
            ledger.TALLIES
        ),
        [attempts],
    )
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ledger.ATTEMPTS))
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ledger.ENTRIES))
    return time.monotonic() - started


class Feeder:
    """Keeps bodies coming while the migration runs, however long it takes: whenever fewer
    than ``low`` entries are pending, ``more`` new ones join the table, each body sleeping
    ``BODY_SECONDS``."""

    def __init__(self, dsn: str, *, low: int = 30, more: int = 50) -> None:
        self._dsn = dsn
        self._low = low
        self._more = more
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join(30)

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stopping.wait(0.3):
                if pending_count(conn) >= self._low:
                    continue
                row = conn.execute("SELECT coalesce(max(id), 0) FROM journal_entry").fetchone()
                assert row is not None
                schema.seed(conn, count=self._more)
                conn.execute(
                    "INSERT INTO demo_faults (entry_id, kind, seconds, unfenced) "
                    "SELECT id, 'sleep', %s, false FROM journal_entry WHERE id > %s",
                    [BODY_SECONDS, row[0]],
                )


def bodies_done(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM task_runs").fetchone()
    assert row is not None
    return int(row[0])


class LockSampler:
    """Samples ``pg_locks`` of one backend every 10 ms: the longest it held, without a gap,
    a table lock that blocks writers of a ledger table (a mode stronger than ``ROW
    EXCLUSIVE``)."""

    STRONG = ("ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")

    def __init__(self, dsn: str, *, pid: int) -> None:
        self._dsn = dsn
        self._pid = pid
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-sampler", daemon=True)
        self._holding: dict[tuple[str, str], tuple[float, float]] = {}
        self.longest_seconds = 0.0
        self.longest_what = "none seen"

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join(10)
        for key in list(self._holding):
            self._released(key)

    def _released(self, key: tuple[str, str]) -> None:
        first, last = self._holding.pop(key)
        if last - first > self.longest_seconds:
            self.longest_seconds, self.longest_what = last - first, f"{key[1]} on {key[0]}"

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stopping.is_set():
                now = time.monotonic()
                seen = {
                    (str(relation), str(mode))
                    for relation, mode in conn.execute(
                        "SELECT l.relation::regclass::text, l.mode FROM pg_locks l "
                        "JOIN pg_class c ON c.oid = l.relation "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE l.locktype = 'relation' AND l.pid = %s AND l.granted "
                        "AND n.nspname = %s AND l.mode = ANY(%s)",
                        [self._pid, ledger.SCHEMA, list(self.STRONG)],
                    )
                }
                for key in [key for key in self._holding if key not in seen]:
                    self._released(key)
                for key in seen:
                    first, _ = self._holding.get(key, (now, now))
                    self._holding[key] = (first, now)
                time.sleep(0.01)


def test_a_migration_over_a_large_history_kills_no_body_and_loses_no_attempt(
    caplog: pytest.LogCaptureFixture,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    with psycopg.connect(demo_dsn, autocommit=True) as setup:
        ledger.ensure_schema(setup)
        seeded_seconds = seed_history(setup, attempts=HISTORY)
    print(f"\nseeded {HISTORY:,} finished attempts in {seeded_seconds:.1f} s")
    schema.seed(conn, count=ENTRIES)
    conn.execute(
        "INSERT INTO demo_faults (entry_id, kind, seconds, unfenced) "
        "SELECT n, 'sleep', %s, false FROM generate_series(1, %s) AS n",
        [BODY_SECONDS, ENTRIES],
    )
    worker = start_worker(
        broker_url=redis_url,
        dsn=demo_dsn,
        concurrency=2,
        extra_env={"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_SECONDS)},
    )
    policy = make_policy(lease_timeout="10m", limits={"batchSize": 20, "maxInFlight": 20})
    with BodyWatch(demo_dsn) as watch, Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
        wait_for(
            lambda: pending_count(conn) < ENTRIES - 10,
            timeout_seconds=60,
            what="the worker running bodies",
        )
        with (
            Feeder(demo_dsn),
            psycopg.connect(demo_dsn, autocommit=True) as migrator,
            LockSampler(demo_dsn, pid=migrator.info.backend_pid) as sampler,
        ):
            done_before = bodies_done(conn)
            caplog.set_level(logging.INFO, logger=migrations.__name__)
            started = time.monotonic()
            version = ledger.ensure_schema(migrator, versions=(*ledger.MIGRATIONS, NEXT_RELEASE))
            migration_seconds = time.monotonic() - started
            done_during = bodies_done(conn) - done_before
            still_pending = pending_count(conn)
        print(
            f"migration to version {version}: {migration_seconds:.1f} s, {done_during} bodies "
            f"ran meanwhile; the longest lock it held that blocks writers (sampled every "
            f"10 ms): {sampler.longest_seconds:.2f} s ({sampler.longest_what}); its own "
            f"report: {[r.getMessage() for r in caplog.records if r.name == migrations.__name__]}"
        )
        wait_for(
            lambda: pending_count(conn) == 0,
            timeout_seconds=120,
            what="every body finished",
            poll_seconds=0.5,
        )
        runs = timed_runs(conn, died_at=dict(watch.died_at))

    attempts = conn.execute(
        "SELECT count(*), count(DISTINCT entry_id), max(attempt) FROM celery_reconciler.attempts "
        "WHERE policy_key = %s",
        [policy.key],
    ).fetchone()
    entries = conn.execute("SELECT count(*) FROM journal_entry").fetchone()
    assert entries is not None
    total = int(entries[0])
    verdict = {
        "bodies ran during the migration, and were still to run at its end": (
            done_during > 0 and still_pending > 0
        ),
        "runs": len(runs),
        "overlapping runs": len(overlapping(runs)),
        "attempts charged as lost": len(lost_attempts(conn)),
        "attempts (all, entries, highest number)": attempts,
        "effects applied once each": set(successes_by_entry(conn).values()),
        "worker processes that ended": conn.execute(
            "SELECT count(*) FROM celery_reconciler.incarnations "
            "WHERE hostname = %s AND ended_at IS NOT NULL",
            [worker.name],
        ).fetchone(),
        "history rows not backfilled": conn.execute(
            "SELECT count(*) FROM celery_reconciler.attempts "
            "WHERE policy_key = 'history/old' AND seconds IS NULL"
        ).fetchone(),
        "index valid": conn.execute(
            "SELECT indisvalid FROM pg_index "
            "WHERE indexrelid = to_regclass('celery_reconciler.attempts_by_seconds')"
        ).fetchone(),
    }
    assert verdict == {
        "bodies ran during the migration, and were still to run at its end": True,
        "runs": total,
        "overlapping runs": 0,
        "attempts charged as lost": 0,
        "attempts (all, entries, highest number)": (total, total, 1),
        "effects applied once each": {1},
        "worker processes that ended": (0,),
        "history rows not backfilled": (0,),
        "index valid": (True,),
    }, (runs, lost_attempts(conn))


def test_a_migration_that_cannot_get_its_lock_makes_no_writer_wait_behind_it(
    demo_dsn: str,
) -> None:
    """A long transaction reads ``entries`` (a report, a body's fenced transaction), so a
    migration's ``ALTER TABLE`` cannot get its lock. Waiting for it in the lock queue would
    make every writer of ``entries`` — each heartbeat — wait behind it for as long as that
    transaction lasts. It gives up at its lock timeout instead, and tries again: a writer
    whose own lock timeout is five times the migration's gets through every time, and the
    migration is applied once the reader is done."""
    with psycopg.connect(demo_dsn, autocommit=True) as setup:
        ledger.ensure_schema(setup)
    version = ledger.SCHEMA_VERSION + 1
    alter = sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS note text").format(ledger.ENTRIES)
    outcome: list[BaseException | int] = []

    def migrate() -> None:
        try:
            with psycopg.connect(demo_dsn, autocommit=True) as migrator:
                outcome.append(
                    ledger.ensure_schema(
                        migrator, versions=(*ledger.MIGRATIONS, (version, (alter,)))
                    )
                )
        except BaseException as error:  # reported below
            outcome.append(error)

    with psycopg.connect(demo_dsn) as reader, psycopg.connect(demo_dsn, autocommit=True) as writer:
        reader.execute(sql.SQL("SELECT count(*) FROM {}").format(ledger.ENTRIES))  # stays open
        writer.execute(
            sql.SQL("SET lock_timeout = {}").format(
                sql.Literal(round(5 * migrations.MIGRATION_LOCK_TIMEOUT_SECONDS * 1000))
            )
        )
        migration = threading.Thread(target=migrate, name="migrate", daemon=True)
        migration.start()
        writes = 0
        for _ in range(20):
            writer.execute(
                sql.SQL("UPDATE {} SET updated_at = now() WHERE policy_key = 'none'").format(
                    ledger.ENTRIES
                )
            )
            writes += 1
            time.sleep(0.1)
        assert not outcome, outcome  # still waiting for the reader
        reader.rollback()
        migration.join(60)
    assert (writes, outcome) == (20, [version])
