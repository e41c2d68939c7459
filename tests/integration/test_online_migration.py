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
* it runs while the worker's bodies run; afterwards: no body was killed, no attempt lost or
  doubled, the backfill complete. The longest lock the migration held, sampled from
  ``pg_locks``, is printed.
"""

from __future__ import annotations

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

HISTORY = 300_000
ENTRIES = 600
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
        with psycopg.connect(demo_dsn, autocommit=True) as migrator:
            with LockSampler(demo_dsn, pid=migrator.info.backend_pid) as sampler:
                started = time.monotonic()
                version = ledger.ensure_schema(
                    migrator, versions=(*ledger.MIGRATIONS, NEXT_RELEASE)
                )
                migration_seconds = time.monotonic() - started
            still_pending = pending_count(conn)
        longest_seconds, what = sampler.longest_seconds, sampler.longest_what
        print(
            f"migration to version {version}: {migration_seconds:.1f} s with "
            f"{ENTRIES - still_pending} bodies done; the longest lock it held that blocks "
            f"writers: {longest_seconds:.2f} s ({what})"
        )
        wait_for(
            lambda: pending_count(conn) == 0,
            timeout_seconds=ENTRIES * BODY_SECONDS + 120,
            what="every body finished",
            poll_seconds=0.5,
        )
        runs = timed_runs(conn, died_at=dict(watch.died_at))

    attempts = conn.execute(
        "SELECT count(*), count(DISTINCT entry_id), max(attempt) FROM celery_reconciler.attempts "
        "WHERE policy_key = %s",
        [policy.key],
    ).fetchone()
    verdict = {
        "bodies still to run when the migration ended": still_pending > 0,
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
        "bodies still to run when the migration ended": True,
        "runs": ENTRIES,
        "overlapping runs": 0,
        "attempts charged as lost": 0,
        "attempts (all, entries, highest number)": (ENTRIES, ENTRIES, 1),
        "effects applied once each": {1},
        "worker processes that ended": (0,),
        "history rows not backfilled": (0,),
        "index valid": (True,),
    }, (runs, lost_attempts(conn))
