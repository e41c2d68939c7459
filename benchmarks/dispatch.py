"""The dispatch benchmark: seed's loop vs the raw limit vs ``reconcile_once``.

Each variant drains the same fresh backlog into Redis, one after the other in one run:

(a) the seed's way: per entry, an UPDATE (its own commit) and Celery's ``send_task``;
(b) the raw limit, with no code of ours: per page, one ``UPDATE ... RETURNING`` of the
    source table and one pipelined ``LPUSH`` of Celery messages prepared from a template
    (Celery's own message API, once) — about the least work that still dispatches valid
    messages and marks what was dispatched;
(c) ours: one ``reconcile_once`` sweep — ledger claim per page (a transaction), publish in
    a thread while the next page is claimed;
(d) the ceiling, our parts alone (issue 25): the claim alone (the same sweep, its publish
    doing nothing) and the publish alone (the same number of messages, prebuilt, published
    page by page through our publisher, no database). Overlapped perfectly, a sweep costs
    the slower part: ``ours/slower part`` says how close it comes.

Raw, ours and the parts alternate for ``--rounds`` rounds (3) on fresh backlogs and the
median round's ratio is reported with every round's. It prints entries per second and the
ratios ours/raw, ours/seed and ours/slower part; and, in a separate pass under tracemalloc,
the peak Python heap of each. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import functools
import json
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import celery
import psycopg
import redis

from celery_app.demo import schema
from celery_reconciler import broker, policy, reconcile
from devstack import postgres as devstack_postgres
from devstack import redis as devstack_redis

QUEUE = "insights"


@dataclasses.dataclass(frozen=True)
class Measurement:
    label: str
    entries: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else 0.0


def median_round(ratios: Sequence[float]) -> int:
    """The index of the round whose ratio is the median of ``ratios``."""
    return sorted(range(len(ratios)), key=lambda index: ratios[index])[len(ratios) // 2]


@dataclasses.dataclass(frozen=True)
class Ceiling:
    """Ours as a fraction of the slower of its parts alone, round by round (each ratio from
    one round's runs), and the parts of the median round."""

    ratios: list[float]
    round: int  # the median round
    claim: Measurement
    publish: Measurement

    @classmethod
    def of(
        cls,
        ours: Sequence[Measurement],
        claims: Sequence[Measurement],
        publishes: Sequence[Measurement],
    ) -> Ceiling:
        ratios = [
            mine.per_second / min(claim.per_second, published.per_second)
            for mine, claim, published in zip(ours, claims, publishes, strict=True)
        ]
        median = median_round(ratios)
        return cls(ratios=ratios, round=median, claim=claims[median], publish=publishes[median])

    @property
    def ratio(self) -> float:
        return self.ratios[self.round]

    def line(self) -> str:
        slower = min(self.claim, self.publish, key=lambda part: part.per_second)
        return (
            f"  ours/slower part ({slower.label[4:]}) = {self.ratio:.2f} (median of "
            f"{len(self.ratios)} rounds: "
            + ", ".join(f"{ratio:.2f}" for ratio in self.ratios)
            + ")"
        )


def fresh_backlog(server: devstack_postgres.PostgresServer, name: str, entries: int) -> str:
    dsn = server.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        schema.seed(conn, count=entries)
        conn.execute("VACUUM ANALYZE journal_entry")
    return dsn


def queued(url: str) -> int:
    return int(redis.Redis.from_url(url).llen(QUEUE))


def seed_way(dsn: str, url: str, *, entries: int) -> Measurement:
    """Per entry: UPDATE (its own commit) then send_task, one broker round trip each."""
    app = celery.Celery("seed", broker=url, set_as_current=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM journal_entry WHERE NOT insights_extracted "
                "ORDER BY created_at, id LIMIT %s",
                [entries],
            )
        ]
        app.connection_for_write().ensure_connection()
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for entry_id in ids:
                conn.execute(
                    "UPDATE journal_entry SET insights = '{\"queued\": true}' WHERE id = %s",
                    [entry_id],
                )
                app.send_task(
                    schema.TASK_NAME, args=[str(entry_id)], queue=QUEUE, producer=producer
                )
        seconds = time.perf_counter() - started
    app.close()
    return Measurement("(a) seed: per-entry UPDATE + send_task", len(ids), seconds)


class PreparedMessages:
    """Celery messages for the raw limit, prepared without any code of ours.

    Celery's own message API (``create_task_message``) builds one sample message up front;
    each real message is that sample's JSON with the entry id, task id and delivery tag put
    in by ``%`` formatting — the least work a publisher of valid Celery messages can do.
    """

    def __init__(self, url: str) -> None:
        app = celery.Celery("raw", broker=url, set_as_current=False)
        headers, properties, body, _ = app.amqp.create_task_message(
            "%(task_id)s", schema.TASK_NAME, ["%(entry_id)s"], {}, create_sent_event=False
        )
        headers["argsrepr"] = "['%(entry_id)s']"
        envelope = {
            "body": "%(body)s",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": "%(tag)s",
            },
        }
        self._envelope = json.dumps(envelope)
        self._body = json.dumps(body)

    def message(self, entry_id: str, task_id: str) -> str:
        body = self._body % {"entry_id": entry_id}
        return self._envelope % {
            "task_id": task_id,
            "entry_id": entry_id,
            "body": base64.b64encode(body.encode()).decode(),
            "tag": uuid.uuid4(),
        }


def raw_limit(dsn: str, url: str, *, batch_size: int) -> Measurement:
    """Per page: one UPDATE ... RETURNING, then one pipelined LPUSH of prepared messages —
    redis-py, psycopg and Celery's message API, no code of ours."""
    prepared = PreparedMessages(url)
    client = redis.Redis.from_url(url)
    # Keyset pagination like ours, so both read only the pending index, page after page.
    claim_page = """
        UPDATE journal_entry SET insights = '{"queued": true}'
        WHERE id IN (
            SELECT id FROM journal_entry
            WHERE NOT insights_extracted AND (created_at, id) > (%s, %s)
            ORDER BY created_at, id LIMIT %s
        )
        RETURNING id::text, gen_random_uuid()::text, created_at, id
    """
    total = 0
    after: tuple[Any, Any] = (datetime.datetime.min.replace(tzinfo=datetime.UTC), 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        while True:
            rows = conn.execute(claim_page, [*after, batch_size]).fetchall()
            if not rows:
                break
            with client.pipeline(transaction=False) as pipe:
                pipe.lpush(QUEUE, *(prepared.message(row[0], row[1]) for row in rows))
                pipe.execute()
            total += len(rows)
            after = max((row[2], row[3]) for row in rows)
        seconds = time.perf_counter() - started
    client.close()
    return Measurement("(b) raw: UPDATE..RETURNING + pipelined LPUSH", total, seconds)


def ours(dsn: str, url: str, *, entries: int, batch_size: int) -> tuple[Measurement, Any]:
    """One ``reconcile_once`` sweep over the whole backlog."""
    spec = schema.policy_spec(limits={"batchSize": batch_size, "maxInFlight": entries})
    parsed = policy.parse_policy(spec, namespace="bench", name="dispatch")
    db = reconcile.Database(dsn)
    db.connection()  # connect and create the ledger schema outside the timing
    publisher = broker.connect(url)
    started = time.perf_counter()
    result = reconcile.reconcile_once(parsed, db=db, broker=publisher)
    seconds = time.perf_counter() - started
    publisher.close()
    db.close()
    return Measurement("(c) ours: reconcile_once", result.published, seconds), result


def claim_alone(dsn: str, url: str, *, entries: int, batch_size: int) -> Measurement:
    """Our claim without any publish: one ``reconcile_once`` whose publish does nothing."""
    spec = schema.policy_spec(limits={"batchSize": batch_size, "maxInFlight": entries})
    parsed = policy.parse_policy(spec, namespace="bench", name="dispatch")
    db = reconcile.Database(dsn)
    db.connection()
    publisher = broker.connect(url)
    started = time.perf_counter()
    result = reconcile.reconcile_once(
        parsed, db=db, broker=publisher, publish=lambda messages: len(messages)
    )
    seconds = time.perf_counter() - started
    publisher.close()
    db.close()
    return Measurement("(d) our claim alone (no publish)", result.claimed, seconds)


def publish_alone(url: str, *, entries: int, batch_size: int) -> Measurement:
    """Our publisher alone: ``entries`` prebuilt messages, a page at a time, no database."""
    messages = [
        broker.TaskMessage(entry_id=str(number), task_id=str(uuid.uuid4()))
        for number in range(1, entries + 1)
    ]
    publisher = broker.connect(url)
    started = time.perf_counter()
    for first in range(0, entries, batch_size):
        publisher.publish(
            task_name=schema.TASK_NAME,
            queue=QUEUE,
            messages=messages[first : first + batch_size],
            time_limits_seconds=None,
        )
    seconds = time.perf_counter() - started
    publisher.close()
    return Measurement("(d) our publish alone (no database)", entries, seconds)


def peak_heap_mib(dispatch: Callable[[], object]) -> float:
    """Peak Python heap (tracemalloc) while ``dispatch`` runs. Measured in a pass of its own:
    tracemalloc slows allocation, so it must never share a run with the timings."""
    tracemalloc.start()
    try:
        dispatch()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def memory_pass(
    database: devstack_postgres.PostgresServer,
    broker_url: str,
    *,
    entries: int,
    batch_size: int,
) -> dict[str, float]:
    client = redis.Redis.from_url(broker_url)
    peaks: dict[str, float] = {}
    variants: dict[str, Callable[[str], object]] = {
        "seed": lambda dsn: seed_way(dsn, broker_url, entries=entries),
        "raw": lambda dsn: raw_limit(dsn, broker_url, batch_size=batch_size),
        "ours": lambda dsn: ours(dsn, broker_url, entries=entries, batch_size=batch_size),
    }
    for name, variant in variants.items():
        client.flushall()
        dsn = fresh_backlog(database, f"bench_memory_{name}", entries)
        peaks[name] = peak_heap_mib(functools.partial(variant, dsn))
        assert queued(broker_url) == entries
    return peaks


def run(
    *,
    entries: int,
    seed_entries: int,
    batch_size: int,
    memory_entries: int,
    rounds: int,
    workdir: Path,
) -> list[str]:
    database = devstack_postgres.start(workdir)
    broker_server = devstack_redis.start(workdir)
    client = redis.Redis.from_url(broker_server.url)
    lines: list[str] = []
    try:
        results: dict[str, Measurement] = {}
        client.flushall()
        dsn = fresh_backlog(database, "bench_seed", seed_entries)
        results["seed"] = seed_way(dsn, broker_server.url, entries=seed_entries)
        assert queued(broker_server.url) == results["seed"].entries

        # Raw and ours alternate, round after round, on fresh backlogs; the median round is
        # reported, so one slow moment of a shared machine does not decide the ratio.
        raw_rounds: list[Measurement] = []
        our_rounds: list[tuple[Measurement, Any]] = []
        claim_rounds: list[Measurement] = []
        publish_rounds: list[Measurement] = []
        for round_number in range(rounds):
            client.flushall()
            dsn = fresh_backlog(database, f"bench_raw_{round_number}", entries)
            raw_rounds.append(raw_limit(dsn, broker_server.url, batch_size=batch_size))
            assert queued(broker_server.url) == raw_rounds[-1].entries == entries

            client.flushall()
            dsn = fresh_backlog(database, f"bench_ours_{round_number}", entries)
            our_rounds.append(ours(dsn, broker_server.url, entries=entries, batch_size=batch_size))
            assert queued(broker_server.url) == our_rounds[-1][0].entries == entries

            client.flushall()
            dsn = fresh_backlog(database, f"bench_claim_{round_number}", entries)
            claim_rounds.append(
                claim_alone(dsn, broker_server.url, entries=entries, batch_size=batch_size)
            )
            assert queued(broker_server.url) == 0 and claim_rounds[-1].entries == entries

            client.flushall()
            publish_rounds.append(
                publish_alone(broker_server.url, entries=entries, batch_size=batch_size)
            )
            assert queued(broker_server.url) == entries
        ratios = [
            mine.per_second / raw.per_second
            for raw, (mine, _) in zip(raw_rounds, our_rounds, strict=True)
        ]
        raw_round = median_round(ratios)
        results["raw"] = raw_rounds[raw_round]
        results["ours"], sweep = our_rounds[raw_round]
        ceiling = Ceiling.of([mine for mine, _ in our_rounds], claim_rounds, publish_rounds)
        results["claim"], results["publish"] = ceiling.claim, ceiling.publish
        peaks = memory_pass(
            database, broker_server.url, entries=memory_entries, batch_size=batch_size
        )
    finally:
        broker_server.stop()
        database.remove()

    lines.append(
        f"dispatch throughput: backlog of {entries:,} pending entries, pages of {batch_size}"
        + (f" (the seed's loop measured on {seed_entries:,})" if seed_entries != entries else "")
    )
    for measurement in results.values():
        lines.append(
            f"  {measurement.label:<48} {measurement.per_second:>9,.0f} entries/s"
            f"   ({measurement.entries:,} in {measurement.seconds:.2f} s)"
        )
    lines.append(
        f"  ours: claim {sweep.claim_seconds:.2f} s, publish {sweep.publish_seconds:.2f} s"
        f" (overlapped) in {sweep.pages} pages"
    )
    ours_rate, raw_rate, seed_rate = (
        results["ours"].per_second,
        results["raw"].per_second,
        results["seed"].per_second,
    )
    lines.append(
        f"  ours/raw = {ours_rate / raw_rate:.2f} (median of {rounds} alternating rounds: "
        + ", ".join(f"{ratio:.2f}" for ratio in ratios)
        + f")   ours/seed = {ours_rate / seed_rate:.1f}x"
    )
    lines.append(ceiling.line())
    lines.append(
        f"memory: peak Python heap while dispatching {memory_entries:,} entries (tracemalloc, "
        "a separate pass)"
    )
    lines.append(
        "  "
        + "   ".join(f"{name} {peak:.1f} MiB" for name, peak in peaks.items())
        + f"   ours/raw = {peaks['ours'] / peaks['raw']:.2f}"
        + f"   ours/seed = {peaks['ours'] / peaks['seed']:.2f}"
    )
    lines.append(
        "  json: "
        + json.dumps(
            {
                "entries": entries,
                "seed_per_second": round(seed_rate),
                "raw_per_second": round(raw_rate),
                "ours_per_second": round(ours_rate),
                "ours_over_raw": round(ours_rate / raw_rate, 3),
                "ours_over_raw_rounds": [round(ratio, 3) for ratio in ratios],
                "ours_over_seed": round(ours_rate / seed_rate, 2),
                "claim_alone_per_second": round(results["claim"].per_second),
                "publish_alone_per_second": round(results["publish"].per_second),
                "ours_over_slower_part": round(ceiling.ratio, 3),
                "ours_over_slower_part_rounds": [round(ratio, 3) for ratio in ceiling.ratios],
                "memory_entries": memory_entries,
                "peak_heap_mib": {name: round(peak, 2) for name, peak in peaks.items()},
            }
        )
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000, help="backlog size (100000)")
    parser.add_argument(
        "--seed-entries",
        type=int,
        help="entries for the seed's slow loop (default: the same backlog)",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="page size (500)")
    parser.add_argument(
        "--memory-entries",
        type=int,
        default=20_000,
        help="backlog of the separate memory pass (20000)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating raw/ours rounds, median kept (3)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="cr-bench-") as workdir:
        for line in run(
            entries=args.entries,
            seed_entries=args.seed_entries or args.entries,
            batch_size=args.batch_size,
            memory_entries=args.memory_entries,
            rounds=args.rounds,
            workdir=Path(workdir),
        ):
            print(line, flush=True)
    return 0
