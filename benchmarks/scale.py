"""The scale benchmark: what history costs a sweep and a status read.

Two questions, each answered by the same work on a small and on a large database in one run:

(a) status with history: ``reconcile.collect_status`` (what every sweep and every status
    refresh runs) for one policy whose ledger is empty, then for one whose ledger holds
    ``--rows`` succeeded entries and as many finished attempts; both with the same small
    backlog. First the read an operator makes right after it starts (on a new connection,
    no window of outcomes yet), then the later reads. For context it also times what
    counting the succeeded rows would cost — the query the status ran before the tally.
(b) a sweep against a big table: one ``reconcile_once`` dispatching the same backlog from
    a source table of 100k rows and of ``--rows`` rows (all others processed), through the
    partial index on the pending predicate.

The large ledger and table are filled server-side (``generate_series``), not through our
code. It prints median times and the ratios large/small; timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import redis

from celery_app.demo import schema
from celery_reconciler import broker, ledger, policy, reconcile
from devstack import postgres as devstack_postgres
from devstack import redis as devstack_redis

BACKLOG = 1000


def median_seconds(run: Callable[[], object], *, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def parsed_policy() -> policy.Policy:
    spec = schema.policy_spec(limits={"batchSize": 500, "maxInFlight": BACKLOG})
    return policy.parse_policy(spec, namespace="bench", name="scale")


def status_database(server: devstack_postgres.PostgresServer, name: str, *, history: int) -> str:
    """A backlog of ``BACKLOG`` pending entries and ``history`` succeeded ledger rows (each
    with its finished attempt), folded into the tally as a long-running operator leaves them."""
    dsn = server.create_database(name)
    key = parsed_policy().key
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        schema.seed(conn, count=BACKLOG, processed=history)
        ledger.ensure_schema(conn)
        # The policy's rules, as every sweep publishes them (its survey's first part).
        ledger.survey(conn, parsed_policy(), stranded_seconds=0.0)
        conn.execute(
            """
            INSERT INTO celery_reconciler.entries (policy_key, entry_id, state, attempt,
                fence_token, dispatched_at, started_at, finished_at, counted)
            SELECT %(key)s, n::text, 'succeeded', 1, gen_random_uuid(),
                now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour',
                true
            FROM generate_series(1, %(rows)s) AS n
            """,
            {"key": key, "rows": history},
        )
        conn.execute(
            """
            INSERT INTO celery_reconciler.attempts (policy_key, entry_id, attempt, fence_token,
                worker, outcome, dispatched_at, started_at, finished_at)
            SELECT policy_key, entry_id, 1, fence_token, 'bench', 'succeeded', dispatched_at,
                started_at, finished_at
            FROM celery_reconciler.entries WHERE policy_key = %(key)s
            """,
            {"key": key},
        )
        conn.execute(
            "INSERT INTO celery_reconciler.tallies (policy_key, succeeded) VALUES (%s, %s)",
            [key, history],
        )
        conn.execute("VACUUM ANALYZE")
    return dsn


def first_status_seconds(dsn: str, *, repeat: int) -> float:
    """The first status read of an operator that just started (no window of outcomes yet),
    each on a connection of its own made outside the timing; the median."""
    parsed = parsed_policy()
    timings = []
    for _ in range(repeat):
        db = reconcile.Database(dsn)
        try:
            db.connection()
            started = time.perf_counter()
            reconcile.collect_status(parsed, db=db, outcomes_since=None)
            timings.append(time.perf_counter() - started)
        finally:
            db.close()
    return statistics.median(timings)


def status_seconds(dsn: str, *, repeat: int) -> tuple[float, float]:
    """(collect_status, counting the succeeded rows), medians."""
    parsed = parsed_policy()
    db = reconcile.Database(dsn)
    try:
        # Connect outside the timing; the first read opens the window of outcomes, every
        # later one counts those since the read before.
        first = reconcile.collect_status(parsed, db=db, outcomes_since=None)
        since = first.outcomes.until
        ours = median_seconds(
            lambda: reconcile.collect_status(parsed, db=db, outcomes_since=since), repeat=repeat
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            counting = median_seconds(
                lambda: conn.execute(
                    "SELECT count(*) FROM celery_reconciler.entries "
                    "WHERE policy_key = %s AND state = 'succeeded'",
                    [parsed.key],
                ).fetchone(),
                repeat=repeat,
            )
    finally:
        db.close()
    return ours, counting


def sweep_database(server: devstack_postgres.PostgresServer, name: str, *, table_rows: int) -> str:
    dsn = server.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        schema.seed(conn, count=BACKLOG, processed=table_rows - BACKLOG)
        conn.execute("VACUUM ANALYZE journal_entry")
    return dsn


def sweep_seconds(dsn: str, url: str) -> float:
    parsed = parsed_policy()
    db = reconcile.Database(dsn)
    publisher = broker.connect(url)
    try:
        db.connection()
        started = time.perf_counter()
        result = reconcile.reconcile_once(parsed, db=db, broker=publisher)
        seconds = time.perf_counter() - started
    finally:
        publisher.close()
        db.close()
    if result.published != BACKLOG:
        raise RuntimeError(f"the sweep dispatched {result.published}, not {BACKLOG}")
    return seconds


def run(*, rows: int, repeat: int, workdir: Path) -> list[str]:
    database = devstack_postgres.start(workdir)
    broker_server = devstack_redis.start(workdir)
    try:
        empty = status_database(database, "status_empty", history=0)
        seeding_started = time.perf_counter()
        full = status_database(database, "status_full", history=rows)
        seeding_seconds = time.perf_counter() - seeding_started
        empty_first = first_status_seconds(empty, repeat=repeat)
        full_first = first_status_seconds(full, repeat=repeat)
        empty_status, empty_count = status_seconds(empty, repeat=repeat)
        full_status, full_count = status_seconds(full, repeat=repeat)
        sweeps: dict[int, float] = {}
        for table_rows in (100_000, rows):
            redis.Redis.from_url(broker_server.url).flushall()
            dsn = sweep_database(database, f"sweep_{table_rows}", table_rows=table_rows)
            sweeps[table_rows] = sweep_seconds(dsn, broker_server.url)
    finally:
        broker_server.stop()
        database.remove()
    return [
        f"ledger of {rows:,} succeeded entries + attempts seeded (generate_series, VACUUM "
        f"ANALYZE) in {seeding_seconds:.0f} s",
        f"first status read after a start: a backlog of {BACKLOG:,}; median of {repeat} starts",
        f"  empty ledger                        {empty_first * 1000:>9.2f} ms",
        f"  {rows:>10,} succeeded + attempts   {full_first * 1000:>9.2f} ms"
        f"   large/empty = {full_first / empty_first:.2f}",
        f"status with history: a backlog of {BACKLOG:,}; median of {repeat} reads",
        f"  empty ledger                        {empty_status * 1000:>9.2f} ms",
        f"  {rows:>10,} succeeded + attempts   {full_status * 1000:>9.2f} ms"
        f"   large/empty = {full_status / empty_status:.2f}",
        f"  (counting the succeeded rows instead: {empty_count * 1000:.2f} ms -> "
        f"{full_count * 1000:.2f} ms)",
        f"sweep against a big table: {BACKLOG:,} pending, partial index on the predicate",
        f"  {100_000:>10,} rows                    {sweeps[100_000] * 1000:>9.1f} ms",
        f"  {rows:>10,} rows                    {sweeps[rows] * 1000:>9.1f} ms"
        f"   large/small = {sweeps[rows] / sweeps[100_000]:.2f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__)
    parser.add_argument(
        "--rows", type=int, default=10_000_000, help="history and table size (10000000)"
    )
    parser.add_argument("--repeat", type=int, default=21, help="status reads per ledger (21)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-bench-scale-") as workdir:
        for line in run(rows=args.rows, repeat=args.repeat, workdir=Path(workdir)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
