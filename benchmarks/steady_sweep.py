"""The steady state of a backlog larger than ``maxInFlight``: sweeps with one free slot.

A backlog of ``--factor`` x ``--max-in-flight`` pending entries (10 x 20,000) is filled to
``maxInFlight`` by a first sweep (not timed). Then, ``--rounds`` times, one slot frees the
way a worker frees it (the oldest in-flight entry's body marks its row processed and the
ledger records the success) and one ``reconcile_once`` sweep is timed: it may claim one
entry, and should cost about one page, whatever stands in flight ahead of that entry.

The baseline, measured in the same run against the same server: an idle sweep, the same
policy over a table with nothing pending (``benchmarks.idle_sweep``'s state). It prints the
pages each steady sweep read, the median times and the ratio steady/idle, the part of a
steady sweep spent reading and claiming its pages, and a sweep of the same state with no
slot free (what a sweep does besides its pages). Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis

from celery_app.demo import schema
from celery_reconciler import broker, ledger, policy, reconcile
from devstack import postgres as devstack_postgres
from devstack import redis as devstack_redis


def parsed_policy(*, max_in_flight: int, batch_size: int) -> policy.Policy:
    spec = schema.policy_spec(limits={"batchSize": batch_size, "maxInFlight": max_in_flight})
    return policy.parse_policy(spec, namespace="bench", name="steady")


def backlog_database(
    server: devstack_postgres.PostgresServer, name: str, *, pending: int, processed: int
) -> str:
    dsn = server.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        schema.seed(conn, count=pending, processed=processed)
        conn.execute("VACUUM ANALYZE journal_entry")
    return dsn


def finish_oldest_in_flight(conn: psycopg.Connection[Any]) -> None:
    """What a worker does when a body ends: the row processed, the success recorded."""
    row = conn.execute(
        "SELECT e.entry_id, e.fence_token::text FROM celery_reconciler.entries e "
        "JOIN journal_entry j ON j.id = e.entry_id::bigint "
        "WHERE e.state = 'queued' ORDER BY j.created_at, j.id LIMIT 1"
    ).fetchone()
    if row is None:
        raise RuntimeError("nothing in flight to finish")
    entry_id, fence_token = str(row[0]), str(row[1])
    started = ledger.start_attempt(conn, fence_token=fence_token, entry_id=entry_id, worker="b")
    if started is None:
        raise RuntimeError(f"entry {entry_id} could not start")
    conn.execute("UPDATE journal_entry SET insights_extracted = true WHERE id = %s", [entry_id])
    ledger.record_success(conn, fence_token=started.fence_token)


def timed_sweep(
    parsed: policy.Policy, *, db: reconcile.Database, publisher: broker.Publisher
) -> tuple[float, reconcile.SweepResult]:
    started = time.perf_counter()
    result = reconcile.reconcile_once(parsed, db=db, broker=publisher)
    return time.perf_counter() - started, result


def run(
    *, max_in_flight: int, factor: int, batch_size: int, rounds: int, workdir: Path
) -> list[str]:
    database = devstack_postgres.start(workdir)
    broker_server = devstack_redis.start(workdir)
    parsed = parsed_policy(max_in_flight=max_in_flight, batch_size=batch_size)
    backlog = factor * max_in_flight
    try:
        redis.Redis.from_url(broker_server.url).flushall()
        idle_dsn = backlog_database(database, "idle", pending=0, processed=backlog)
        busy_dsn = backlog_database(database, "steady", pending=backlog, processed=0)
        idle_db, busy_db = reconcile.Database(idle_dsn), reconcile.Database(busy_dsn)
        publisher = broker.connect(broker_server.url)
        try:
            _, filled = timed_sweep(parsed, db=busy_db, publisher=publisher)
            if filled.published != max_in_flight:
                raise RuntimeError(f"the first sweep dispatched {filled.published}")
            for _ in range(3):  # warm both: the first sweep of a policy reads more
                timed_sweep(parsed, db=idle_db, publisher=publisher)
            idle = [timed_sweep(parsed, db=idle_db, publisher=publisher)[0] for _ in range(rounds)]
            steady: list[tuple[float, reconcile.SweepResult]] = []
            with psycopg.connect(busy_dsn, autocommit=True) as conn:
                for _ in range(rounds):
                    finish_oldest_in_flight(conn)
                    steady.append(timed_sweep(parsed, db=busy_db, publisher=publisher))
            # The same state with no slot free: what a sweep costs before any page.
            full = [timed_sweep(parsed, db=busy_db, publisher=publisher)[0] for _ in range(rounds)]
        finally:
            publisher.close()
            idle_db.close()
            busy_db.close()
    finally:
        broker_server.stop()
        database.remove()
    claimed = [result.published for _, result in steady]
    if claimed != [1] * rounds:
        raise RuntimeError(f"steady sweeps claimed {claimed}, not one each")
    pages = [result.pages for _, result in steady]
    idle_median = statistics.median(idle)
    steady_median = statistics.median(seconds for seconds, _ in steady)
    claim_median = statistics.median(result.claim_seconds for _, result in steady)
    full_median = statistics.median(full)
    return [
        f"steady-state sweep: 1 free slot, {max_in_flight:,} in flight, backlog {backlog:,}, "
        f"pages of {batch_size}; median of {rounds}",
        f"  pages per sweep                     {max(pages):>9}   (each: {pages})",
        f"  idle sweep (nothing pending)        {idle_median * 1000:>9.2f} ms",
        f"  steady sweep (claims 1)             {steady_median * 1000:>9.2f} ms"
        f"   steady/idle = {steady_median / idle_median:.2f}",
        f"    of which its pages (claim)        {claim_median * 1000:>9.2f} ms"
        f"   pages/idle = {claim_median / idle_median:.2f}",
        f"  the same with no slot free          {full_median * 1000:>9.2f} ms"
        f"   (the sweep's work besides pages: leases, lost-message check, counts)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks steady-sweep", description=__doc__)
    parser.add_argument("--max-in-flight", type=int, default=20_000, help="maxInFlight (20000)")
    parser.add_argument("--factor", type=int, default=10, help="backlog / maxInFlight (10)")
    parser.add_argument("--batch-size", type=int, default=500, help="batchSize (500)")
    parser.add_argument("--rounds", type=int, default=7, help="timed sweeps of each kind (7)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-bench-steady-") as workdir:
        for line in run(
            max_in_flight=args.max_in_flight,
            factor=args.factor,
            batch_size=args.batch_size,
            rounds=args.rounds,
            workdir=Path(workdir),
        ):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
