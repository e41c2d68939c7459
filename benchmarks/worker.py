"""The worker-side benchmark: what each form of the worker integration costs, against plain Celery.

One prefork worker drains a backlog once per form, one form after the other on a fresh
database and an empty Redis each time:

(a) plain: a stock Celery task (``benchmarks.plain_worker``) whose body marks its row
    processed — the least any Celery task processing an entry does, and no code of ours;
(b) ``ReconciledTask`` (``benchmarks.reconciled_worker``): the same body, with its messages
    dispatched by ``reconcile_once`` — the fence check before the body, the done marks
    (batched into the heartbeat), and whatever else the worker integration does;
(c) ``fenced_transaction`` (``benchmarks.fenced_worker``): the mark committed together with
    the done mark on the body's own psycopg connection (exactly-once effects);
(d) ``fenced_atomic`` (``benchmarks.django_worker``): the same through Django's connection
    and ``transaction.atomic()``.

Each is measured for a no-op body and a 20 ms body, in several rounds (every form in each
round, so a noisy moment hits all), and the median ratio to plain is printed with every
round's. A drain is timed from the first body's mark (each body stamps
``clock_timestamp()`` into the row it marks, so the worker's start-up is not counted) to
the moment the broker holds no message of the queue and none unacknowledged — what a user
waits for, acknowledgements included — read on the database's clock. It prints the rates
and the ratios form/plain; timings are printed, never asserted.
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


@dataclasses.dataclass(frozen=True)
class Form:
    """One way to write the task: its worker app (a module of this package, imported by the
    worker only: the Django one sets Django up) with the queue and task name it declares,
    and how its messages are sent."""

    name: str
    label: str
    app: str
    queue: str
    task_name: str
    dispatched_by_us: bool  # reconcile_once (ledger claims) rather than send_task


FORMS = (
    Form(
        "plain",
        "(a) plain Celery task",
        "benchmarks.plain_worker",
        "bench-plain",
        "bench.plain",
        dispatched_by_us=False,
    ),
    Form(
        "ours",
        "(b) ReconciledTask",
        "benchmarks.reconciled_worker",
        "bench-reconciled",
        "bench.reconciled",
        dispatched_by_us=True,
    ),
    Form(
        "fenced",
        "(c) fenced_transaction",
        "benchmarks.fenced_worker",
        "bench-fenced",
        "bench.fenced",
        dispatched_by_us=True,
    ),
    Form(
        "atomic",
        "(d) Django fenced_atomic",
        "benchmarks.django_worker",
        "bench-atomic",
        "bench.atomic",
        dispatched_by_us=True,
    ),
)


def enqueue_plain(dsn: str, url: str, entries: int, *, form: Form) -> int:
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
                form.task_name,
                args=[str(entry_id)],
                queue=form.queue,
                producer=producer,
            )
    app.close()
    return len(ids)


def enqueue_ours(dsn: str, url: str, entries: int, *, form: Form) -> int:
    """Dispatch every pending entry with one ``reconcile_once`` (claims, then publishes)."""
    spec = schema.policy_spec(limits={"batchSize": min(500, entries), "maxInFlight": entries})
    spec["task"]["name"] = form.task_name
    spec["task"]["queue"] = form.queue
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
    client = redis.Redis.from_url(url)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while True:
                if broker_drained_and_acked(client, queue=queue):
                    row = conn.execute(
                        "SELECT count(*) FILTER (WHERE NOT insights_extracted), "
                        "EXTRACT(EPOCH FROM clock_timestamp() "
                        "- min((insights->>'at')::timestamptz)) FROM journal_entry"
                    ).fetchone()
                    assert row is not None
                    if row[0] == 0:
                        return Drain(label, entries, float(row[1]))
                if time.monotonic() > deadline or not worker.running():
                    raise RuntimeError(
                        f"{label}: not drained; last lines of the worker log:\n"
                        f"{processes.log_tail(worker.log_path)}"
                    )
                time.sleep(DRAIN_POLL_SECONDS)
    finally:
        client.close()
        worker.stop()


# Short against a drain of seconds: the poll's lag is the measurement's error.
DRAIN_POLL_SECONDS = 0.01


def broker_drained_and_acked(client: redis.Redis[bytes], *, queue: str) -> bool:
    """No message of ``queue`` waits in Redis (its priority lists included) and none is
    delivered but unacknowledged (kombu keeps those in the ``unacked`` hash until the ack)."""
    waiting = sum(int(client.llen(key)) for key in client.scan_iter(match=f"{queue}*"))
    return waiting == 0 and int(client.hlen("unacked")) == 0


def run(
    *,
    entries: int,
    slow_entries: int,
    concurrency: int,
    rounds: int,
    forms: Sequence[Form],
    workdir: Path,
) -> list[str]:
    database = devstack_postgres.start(workdir)
    broker_server = devstack_redis.start(workdir)
    client = redis.Redis.from_url(broker_server.url)
    lines = [
        f"worker drain rate: one prefork worker, concurrency {concurrency}, each form of the "
        f"task against a plain Celery task with the same body, {rounds} rounds (every form "
        "in each, so a noisy moment hits all), timed to the broker drained and acked"
    ]
    try:
        for body_seconds, count in ((0.0, entries), (0.02, slow_entries)):
            body = "no-op body" if body_seconds == 0 else f"{body_seconds * 1000:.0f} ms body"
            tag = f"{int(body_seconds * 1000)}ms"
            ratios: dict[str, list[float]] = {form.name: [] for form in forms}
            for round_number in range(rounds):
                measured: dict[str, Drain] = {}
                for form in forms:
                    client.flushall()
                    dsn = fresh_backlog(database, f"bench_{form.name}_{tag}_{round_number}", count)
                    enqueue = enqueue_ours if form.dispatched_by_us else enqueue_plain
                    assert enqueue(dsn, broker_server.url, count, form=form) == count
                    measured[form.name] = drained = drain(
                        label=f"{form.label}, {body}",
                        app=form.app,
                        queue=form.queue,
                        dsn=dsn,
                        url=broker_server.url,
                        entries=count,
                        body_seconds=body_seconds,
                        concurrency=concurrency,
                        workdir=workdir,
                    )
                    lines.append(
                        f"  {drained.label:<44} {drained.per_second:>8,.0f} entries/s"
                        f"   ({drained.entries:,} in {drained.seconds:.2f} s)"
                    )
                plain = measured.get("plain")
                for name, drained in measured.items():
                    if plain is not None:
                        ratios[name].append(drained.per_second / plain.per_second)
            for form in forms:
                if form.name == "plain" or not ratios[form.name]:
                    continue
                found = ratios[form.name]
                lines.append(
                    f"  {body}: {form.label[4:]}/plain = {statistics.median(found):.2f} "
                    "(median; rounds: " + ", ".join(f"{ratio:.2f}" for ratio in found) + ")"
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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all forms per body (3)")
    parser.add_argument(
        "--forms",
        default=",".join(form.name for form in FORMS),
        help="forms to run, comma-separated (all: " + ",".join(form.name for form in FORMS) + ")",
    )
    args = parser.parse_args(argv)
    chosen = args.forms.split(",")
    forms = [form for form in FORMS if form.name in chosen]
    with tempfile.TemporaryDirectory(prefix="cr-bench-worker-") as workdir:
        for line in run(
            entries=args.entries,
            slow_entries=args.slow_entries,
            concurrency=args.concurrency,
            rounds=args.rounds,
            forms=forms,
            workdir=Path(workdir),
        ):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
