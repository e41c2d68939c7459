"""The worker-side benchmark: what ``ReconciledTask`` costs a worker, against plain Celery.

One prefork worker drains a backlog twice, one variant after the other on a fresh database
and an empty Redis each time:

(a) plain: a stock Celery task (``benchmarks.plain_worker``) whose body marks its row
    processed — the least any Celery task processing an entry does, and no code of ours;
(b) ours: the same body as a ``ReconciledTask`` (``benchmarks.reconciled_worker``), with
    its messages dispatched by ``reconcile_once`` — the fence check before the body, the
    done marks (batched into the heartbeat), and whatever else the worker integration does.

Both are measured for a no-op body and a 20 ms body, in several rounds (plain then ours in
each), and the median ratio is printed with every round's. The drain rate is read from the
database — each body stamps ``clock_timestamp()`` into the row it marks — as entries per
second between the first and the last mark, so the worker's start-up is not counted. It
prints the rates and the ratio ours/plain; timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import celery
import psycopg
import redis

from benchmarks import plain_worker, reconciled_worker
from celery_app.demo import schema
from celery_reconciler import broker, policy, reconcile
from devstack import postgres as devstack_postgres
from devstack import processes, workers
from devstack import redis as devstack_redis

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Drain:
    label: str
    entries: int
    seconds: float

    @property
    def per_second(self) -> float:
        return (self.entries - 1) / self.seconds if self.seconds > 0 else 0.0


def fresh_backlog(server: devstack_postgres.PostgresServer, name: str, entries: int) -> str:
    dsn = server.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        schema.seed(conn, count=entries)
    return dsn


def enqueue_plain(dsn: str, url: str, entries: int) -> int:
    """Queue one ``bench.plain`` message for each of the first ``entries`` entries, with
    stock ``send_task``."""
    app = celery.Celery("bench-publisher", broker=url, set_as_current=False)
    with psycopg.connect(dsn) as conn:
        ids = [
            row[0]
            for row in conn.execute("SELECT id FROM journal_entry ORDER BY id LIMIT %s", [entries])
        ]
    with app.producer_or_acquire() as producer:
        for entry_id in ids:
            app.send_task(
                plain_worker.TASK_NAME,
                args=[str(entry_id)],
                queue=plain_worker.QUEUE,
                producer=producer,
            )
    app.close()
    return len(ids)


def enqueue_ours(dsn: str, url: str, entries: int) -> int:
    """Dispatch every pending entry with one ``reconcile_once`` (claims, then publishes)."""
    spec = schema.policy_spec(limits={"batchSize": min(500, entries), "maxInFlight": entries})
    spec["task"]["name"] = reconciled_worker.TASK_NAME
    spec["task"]["queue"] = reconciled_worker.QUEUE
    parsed = policy.parse_policy(spec, namespace="bench", name="worker")
    db = reconcile.Database(dsn)
    publisher = broker.connect(url)
    try:
        return reconcile.reconcile_once(parsed, db=db, broker=publisher).published
    finally:
        publisher.close()
        db.close()


def drain(
    *,
    label: str,
    app: str,
    queue: str,
    dsn: str,
    url: str,
    entries: int,
    body_seconds: float,
    concurrency: int,
    workdir: Path,
) -> Drain:
    worker = workers.start_worker(
        pod_name=f"bench-{queue}",
        broker_url=url,
        dsn=dsn,
        log_dir=workdir,
        concurrency=concurrency,
        app=app,
        queue=queue,
        extra_env={"BENCH_BODY_SECONDS": str(body_seconds), "PYTHONPATH": str(ROOT)},
    )
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while True:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE NOT insights_extracted), "
                    "EXTRACT(EPOCH FROM max((insights->>'at')::timestamptz) "
                    "- min((insights->>'at')::timestamptz)) FROM journal_entry"
                ).fetchone()
                assert row is not None
                if row[0] == 0:
                    return Drain(label, entries, float(row[1]))
                if time.monotonic() > deadline or not worker.running():
                    raise RuntimeError(
                        f"{label}: {row[0]} entries left undrained; last lines of the worker "
                        f"log:\n{processes.log_tail(worker.log_path)}"
                    )
                time.sleep(0.2)
    finally:
        worker.stop()


def run(
    *, entries: int, slow_entries: int, concurrency: int, rounds: int, workdir: Path
) -> list[str]:
    database = devstack_postgres.start(workdir)
    broker_server = devstack_redis.start(workdir)
    client = redis.Redis.from_url(broker_server.url)
    lines = [
        f"worker drain rate: one prefork worker, concurrency {concurrency}, "
        f"ReconciledTask vs a plain Celery task with the same body, {rounds} rounds "
        "(plain then ours in each, so a noisy moment hits both)"
    ]
    try:
        for body_seconds, count in ((0.0, entries), (0.02, slow_entries)):
            body = "no-op body" if body_seconds == 0 else f"{body_seconds * 1000:.0f} ms body"
            tag = f"{int(body_seconds * 1000)}ms"
            ratios = []
            for round_number in range(rounds):
                measured: dict[str, Drain] = {}
                for variant, label, enqueue in (
                    ("plain", f"(a) plain Celery task, {body}", enqueue_plain),
                    ("ours", f"(b) ours: ReconciledTask, {body}", enqueue_ours),
                ):
                    client.flushall()
                    dsn = fresh_backlog(database, f"bench_{variant}_{tag}_{round_number}", count)
                    assert enqueue(dsn, broker_server.url, count) == count
                    module = plain_worker if variant == "plain" else reconciled_worker
                    measured[variant] = drain(
                        label=label,
                        app=module.__name__,
                        queue=module.QUEUE,
                        dsn=dsn,
                        url=broker_server.url,
                        entries=count,
                        body_seconds=body_seconds,
                        concurrency=concurrency,
                        workdir=workdir,
                    )
                plain, ours = measured["plain"], measured["ours"]
                for drained in (plain, ours):
                    lines.append(
                        f"  {drained.label:<40} {drained.per_second:>8,.0f} entries/s"
                        f"   ({drained.entries:,} in {drained.seconds:.2f} s)"
                    )
                ratios.append(ours.per_second / plain.per_second)
            lines.append(
                f"  {body}: ours/plain = {statistics.median(ratios):.2f} (median; rounds: "
                + ", ".join(f"{ratio:.2f}" for ratio in ratios)
                + ")"
            )
    finally:
        broker_server.stop()
        database.remove()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks worker", description=__doc__)
    parser.add_argument("--entries", type=int, default=3000, help="no-op backlog (3000)")
    parser.add_argument(
        "--slow-entries", type=int, default=500, help="backlog for the 20 ms body (500)"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="pool processes (1)")
    parser.add_argument("--rounds", type=int, default=3, help="plain/ours pairs per body (3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-bench-worker-") as workdir:
        for line in run(
            entries=args.entries,
            slow_entries=args.slow_entries,
            concurrency=args.concurrency,
            rounds=args.rounds,
            workdir=Path(workdir),
        ):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
