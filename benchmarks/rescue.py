"""Rescue latency: from a worker pod's death to its rescued bodies running again.

What a user waits for when a worker pod dies mid-run is not the ledger write but the moment
the entries it held *start running again* somewhere else. This benchmark measures exactly
that, on real PostgreSQL, Redis and ``celery worker`` processes, with a backlog big enough
that a re-dispatch joining the queue's tail would wait behind thousands of messages:

1. seed ``--backlog`` pending entries (each body sleeps ``--body-seconds``) and let a sweep
   loop keep ``--max-in-flight`` of them queued, as the operator's loop would;
2. ``--kills`` times: SIGKILL a worker (its process group: a crashed pod) while it runs
   bodies, note the database's clock, and call ``reconcile.rescue`` with the pod ending the
   operator derives from the pod event (the time the kubelet takes to report the death is
   not ours and not included); start a replacement worker under a new pod uid;
3. for every rescued entry, latency = start of its next body run (``task_runs``, the
   database's clock) minus the moment of the rescue.

It prints percentiles, and for comparison the same re-dispatch published at the queue's
tail (``--compare-tail``: the behaviour before re-dispatches went ahead). No figure here is
asserted anywhere: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from celery_app.demo import schema
from celery_reconciler import broker, ledger, planning, policy, reconcile
from devstack import postgres as devstack_postgres
from devstack import processes, workers
from devstack import redis as devstack_redis

SWEEP_PERIOD_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Rescue:
    at: datetime.datetime
    entry_ids: tuple[str, ...]


class Sweeper:
    """The operator's loop in miniature: ``reconcile_once`` every half second, in a thread."""

    def __init__(self, policy_: policy.Policy, *, dsn: str, broker_url: str) -> None:
        self._policy = policy_
        self._dsn = dsn
        self._broker_url = broker_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def __enter__(self) -> Sweeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        db = reconcile.Database(self._dsn, application_name="bench-sweeper")
        publisher = broker.connect(self._broker_url)
        try:
            while not self._stop.is_set():
                reconcile.reconcile_once(self._policy, db=db, broker=publisher)
                self._stop.wait(SWEEP_PERIOD_SECONDS)
        finally:
            publisher.close()
            db.close()


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def database_now(conn: psycopg.Connection[Any]) -> datetime.datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def running_under(conn: psycopg.Connection[Any], pod_uid: str) -> int:
    row = conn.execute(
        """
        SELECT count(*) FROM celery_reconciler.entries e
        JOIN celery_reconciler.incarnations i ON i.id = e.incarnation
        WHERE e.state = 'running' AND i.pod_uid = %s AND i.ended_at IS NULL
        """,
        [pod_uid],
    ).fetchone()
    assert row is not None
    return int(row[0])


def next_start_seconds(conn: psycopg.Connection[Any], rescue: Rescue) -> list[float | None]:
    """For each rescued entry, seconds from the rescue to its next body start (None: none)."""
    rows = dict(
        conn.execute(
            """
            SELECT entry_id::text, min(started_at) FROM task_runs
            WHERE entry_id::text = ANY(%s) AND started_at > %s GROUP BY entry_id
            """,
            [list(rescue.entry_ids), rescue.at],
        ).fetchall()
    )
    return [
        (rows[entry_id] - rescue.at).total_seconds() if entry_id in rows else None
        for entry_id in rescue.entry_ids
    ]


def measure(
    *,
    database: devstack_postgres.PostgresServer,
    broker_url: str,
    workdir: Path,
    name: str,
    backlog: int,
    kills: int,
    worker_count: int,
    body_seconds: float,
    max_in_flight: int,
    ahead: bool,
    drain_seconds: float,
) -> Outcome:
    """Latencies of every rescued entry, what never ran again, and what the drain left."""
    dsn = database.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        ledger.ensure_schema(conn)
        schema.seed(conn, count=backlog)
        conn.execute(
            "INSERT INTO demo_faults (entry_id, kind, seconds) SELECT id, 'sleep', %s "
            "FROM journal_entry",
            [body_seconds],
        )
    policy_ = policy.parse_policy(
        schema.policy_spec(
            lease_timeout="10m",
            limits={"batchSize": 500, "maxInFlight": max_in_flight},
        ),
        namespace="bench",
        name=name,
    )
    live: dict[str, processes.ManagedProcess] = {}

    def start_worker() -> str:
        pod = workers.PodIdentity(
            name=f"w-{uuid.uuid4().hex[:8]}", namespace="bench", uid=str(uuid.uuid4())
        )
        live[pod.uid] = workers.start_worker(
            pod_name=pod.name,
            broker_url=broker_url,
            dsn=dsn,
            log_dir=workdir,
            concurrency=2,
            pod=pod,
        )
        return pod.uid

    rescues: list[Rescue] = []
    waits: list[float | None] = []
    publisher = broker.connect(broker_url)
    if not ahead:
        publisher = TailOnly(publisher)
    db = reconcile.Database(dsn, application_name="bench-rescue")
    try:
        for _ in range(worker_count):
            start_worker()
        with (
            psycopg.connect(dsn, autocommit=True) as conn,
            Sweeper(policy_, dsn=dsn, broker_url=broker_url),
        ):
            for kill in range(kills):
                victim = list(live)[kill % len(live)]
                deadline = time.monotonic() + 30
                while running_under(conn, victim) == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                live.pop(victim).kill()
                at = database_now(conn)
                result = reconcile.rescue(
                    policy_,
                    db=db,
                    broker=publisher,
                    ending=planning.PodEnding(pod_uid=victim, reason="bench kill", whole_pod=True),
                )
                rescues.append(Rescue(at=at, entry_ids=result.expired.retry_ids))
                start_worker()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                waits = [value for rescue in rescues for value in next_start_seconds(conn, rescue)]
                if None not in waits:
                    break
                time.sleep(1)
            # Messages a killed worker took but never started are not in any rescue: they
            # surface here, as entries the backlog's drain cannot finish before their lease.
            drain_deadline = time.monotonic() + drain_seconds
            while unprocessed(conn) and time.monotonic() < drain_deadline:
                time.sleep(1)
            left = unprocessed(conn)
    finally:
        for worker in live.values():
            worker.stop(timeout_seconds=20)
        publisher.close()
        db.close()
    latencies = [value for value in waits if value is not None]
    return Outcome(latencies=latencies, not_rerun=len(waits) - len(latencies), left=left)


@dataclasses.dataclass(frozen=True)
class Outcome:
    latencies: list[float]
    not_rerun: int  # rescued entries that did not run again within the wait
    left: int  # entries still unprocessed when the drain gave up (waiting for a lease)


def unprocessed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM journal_entry WHERE NOT insights_extracted").fetchone()
    assert row is not None
    return int(row[0])


class TailOnly:
    """A publisher that ignores ``ahead``: re-dispatches join the tail, as before."""

    def __init__(self, inner: broker.Publisher) -> None:
        self._inner = inner

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[broker.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
        ahead: bool = False,
    ) -> int:
        return self._inner.publish(
            task_name=task_name,
            queue=queue,
            messages=messages,
            time_limits_seconds=time_limits_seconds,
        )

    def queue_depth(self, queue: str) -> int:
        return self._inner.queue_depth(queue)

    def instance_id(self) -> str | None:
        return self._inner.instance_id()

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        return self._inner.messages_accounted_for(queue, taken_within_seconds=taken_within_seconds)

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        return self._inner.messages_held(queue, taken_within_seconds=taken_within_seconds)

    def close(self) -> None:
        self._inner.close()


def describe(label: str, outcome: Outcome) -> str:
    latencies, stuck = outcome.latencies, outcome.not_rerun
    if not latencies:
        return f"  {label:<34} no rescued entry ran again ({stuck} waiting)"
    return (
        f"  {label:<34} n={len(latencies):<4} p50 {percentile(latencies, 0.5):6.2f} s   "
        f"p90 {percentile(latencies, 0.9):6.2f} s   p99 {percentile(latencies, 0.99):6.2f} s   "
        f"max {max(latencies):6.2f} s   mean {statistics.fmean(latencies):6.2f} s"
        + (f"   not re-run within the wait: {stuck}" if stuck else "")
        + f"   left waiting for a lease after the drain: {outcome.left}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rescue", description=__doc__)
    parser.add_argument("--backlog", type=int, default=5000, help="pending entries (5000)")
    parser.add_argument("--kills", type=int, default=50, help="worker kills (50)")
    parser.add_argument("--workers", type=int, default=3, help="workers, 2 processes each (3)")
    parser.add_argument("--body-seconds", type=float, default=0.2, help="body length (0.2)")
    parser.add_argument("--max-in-flight", type=int, default=2000, help="maxInFlight (2000)")
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=300.0,
        help="how long to let the backlog drain afterwards (300)",
    )
    parser.add_argument(
        "--compare-tail",
        action="store_true",
        help="also measure re-dispatch at the queue's tail (the previous behaviour)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-bench-rescue-") as workdir:
        database = devstack_postgres.start(Path(workdir))
        broker_server = devstack_redis.start(Path(workdir))
        try:
            variants = [("re-dispatched ahead of the queue", True)]
            if args.compare_tail:
                variants.append(("re-dispatched at the queue's tail", False))
            print(
                f"rescue latency: pod death -> rescued body running again; backlog "
                f"{args.backlog:,}, maxInFlight {args.max_in_flight:,}, {args.workers} workers "
                f"x 2 processes, {args.body_seconds} s bodies, {args.kills} kills",
                flush=True,
            )
            for number, (label, ahead) in enumerate(variants):
                broker_server.client().flushall()
                outcome = measure(
                    database=database,
                    broker_url=broker_server.url,
                    workdir=Path(workdir),
                    name=f"bench_rescue_{number}",
                    backlog=args.backlog,
                    kills=args.kills,
                    worker_count=args.workers,
                    body_seconds=args.body_seconds,
                    max_in_flight=args.max_in_flight,
                    ahead=ahead,
                    drain_seconds=args.drain_seconds,
                )
                print(describe(label, outcome), flush=True)
        finally:
            broker_server.stop()
            database.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
