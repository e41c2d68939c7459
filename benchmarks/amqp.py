"""The AMQP dispatch benchmark: ours (confirmed, batched) against kombu's per-message publish.

``python -m benchmarks amqp`` starts its own PostgreSQL and RabbitMQ (devstack) and drains
the same fresh backlog into an empty queue (a fresh virtual host) three times, one after
the other in one run:

(a) kombu, plain: Celery's ``send_task`` in a loop on one reused producer — no code of ours,
    no publisher confirms (a publish the broker never took goes unnoticed);
(b) kombu, confirmed: the same loop with kombu's ``confirm_publish`` transport option, which
    waits for the broker's ack after every message (a round trip each) — the safe baseline;
(c) ours: one ``reconcile_once`` sweep — ledger claims per page, and each page published
    with publisher confirms waited for once per window (``broker.CONFIRM_WINDOW``);
(d) the ceiling, our parts alone (issue 25), as in ``benchmarks.dispatch``: the claim alone
    (the same sweep, its publish doing nothing) and the publish alone (the same messages,
    prebuilt, published and confirmed page by page, no database). ``ours/slower part`` says
    how close the overlapped sweep comes to the slower of the two. Ours and the parts run
    ``--rounds`` times on fresh backlogs and virtual hosts; the median round is reported.

The baselines only publish (no database work), so they are upper bounds for a loop that
also marks its entries. It prints entries/s for each and the ratios ours/plain and
ours/confirmed, and checks the queue holds every message (for the plain loop, once the
broker has caught up: its publishes return before the broker took them). Timings are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import celery

from benchmarks import dispatch
from celery_app.demo import schema
from celery_reconciler import broker
from devstack import postgres as devstack_postgres
from devstack import rabbitmq as devstack_rabbitmq


def kombu_loop(url: str, *, entries: int, confirmed: bool) -> dispatch.Measurement:
    """``send_task`` per message on one producer, as a Celery user's loop would."""
    app = celery.Celery("kombu-loop", broker=url, set_as_current=False)
    if confirmed:
        app.conf.broker_transport_options = {"confirm_publish": True}
    ids = [(str(number), str(uuid.uuid4())) for number in range(1, entries + 1)]
    try:
        with app.producer_or_acquire() as producer:
            producer.connection.connect()  # connect outside the timing, as ours does
            started = time.perf_counter()
            for entry_id, task_id in ids:
                app.send_task(
                    schema.TASK_NAME,
                    args=[entry_id],
                    task_id=task_id,
                    queue=dispatch.QUEUE,
                    producer=producer,
                )
            seconds = time.perf_counter() - started
    finally:
        app.close()
    label = "(b) kombu send_task, confirm_publish" if confirmed else "(a) kombu send_task, plain"
    return dispatch.Measurement(label, entries, seconds)


def queued(url: str) -> int:
    publisher = broker.connect(url)
    try:
        return publisher.queue_depth(dispatch.QUEUE)
    finally:
        publisher.close()


def wait_until_queued(url: str, entries: int, *, timeout_seconds: float = 120) -> None:
    deadline = time.monotonic() + timeout_seconds
    while (depth := queued(url)) != entries:
        if time.monotonic() > deadline:
            raise AssertionError(f"{depth} of {entries} messages queued")
        time.sleep(0.2)


def run(*, entries: int, batch_size: int, rounds: int, workdir: Path) -> list[str]:
    database = devstack_postgres.start(workdir)
    rabbitmq = devstack_rabbitmq.start(workdir)
    results: dict[str, dispatch.Measurement] = {}
    sweep: Any = None
    try:
        for name, confirmed in (("plain", False), ("confirmed", True)):
            url = rabbitmq.add_vhost(f"bench-{name}")
            results[name] = kombu_loop(url, entries=entries, confirmed=confirmed)
            if confirmed:
                assert queued(url) == entries
            else:
                # Unconfirmed publishes return before the broker has them all.
                wait_until_queued(url, entries)
        our_rounds: list[tuple[dispatch.Measurement, Any]] = []
        claim_rounds: list[dispatch.Measurement] = []
        publish_rounds: list[dispatch.Measurement] = []
        for number in range(rounds):
            url = rabbitmq.add_vhost(f"bench-ours-{number}")
            dsn = dispatch.fresh_backlog(database, f"bench_amqp_ours_{number}", entries)
            measurement, result = dispatch.ours(dsn, url, entries=entries, batch_size=batch_size)
            our_rounds.append(
                (dataclasses.replace(measurement, label="(c) ours: reconcile_once"), result)
            )
            assert queued(url) == measurement.entries == entries

            url = rabbitmq.add_vhost(f"bench-claim-{number}")
            dsn = dispatch.fresh_backlog(database, f"bench_amqp_claim_{number}", entries)
            claim_rounds.append(
                dispatch.claim_alone(dsn, url, entries=entries, batch_size=batch_size)
            )
            assert claim_rounds[-1].entries == entries

            url = rabbitmq.add_vhost(f"bench-publish-{number}")
            publish_rounds.append(
                dispatch.publish_alone(url, entries=entries, batch_size=batch_size)
            )
            assert queued(url) == entries
    finally:
        rabbitmq.remove()
        database.remove()

    ceiling = dispatch.Ceiling.of([mine for mine, _ in our_rounds], claim_rounds, publish_rounds)
    results["ours"], sweep = our_rounds[ceiling.round]
    results["claim"], results["publish"] = ceiling.claim, ceiling.publish

    ours, plain, confirmed_rate = (
        results["ours"].per_second,
        results["plain"].per_second,
        results["confirmed"].per_second,
    )
    lines = [f"AMQP dispatch (RabbitMQ): backlog of {entries:,} entries, pages of {batch_size}"]
    for measurement in results.values():
        lines.append(
            f"  {measurement.label:<48} {measurement.per_second:>9,.0f} entries/s"
            f"   ({measurement.entries:,} in {measurement.seconds:.2f} s)"
        )
    lines.append(
        f"  ours: claim {sweep.claim_seconds:.2f} s, publish {sweep.publish_seconds:.2f} s"
        f" (overlapped) in {sweep.pages} pages, every message confirmed"
    )
    lines.append(
        f"  ours/plain = {ours / plain:.2f}   ours/confirmed = {ours / confirmed_rate:.2f}"
    )
    lines.append(ceiling.line())
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks amqp", description=__doc__)
    parser.add_argument("--entries", type=int, default=20_000, help="backlog size (20000)")
    parser.add_argument("--batch-size", type=int, default=500, help="page size (500)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of ours and its parts, median kept (3)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-bench-amqp-") as workdir:
        for line in run(
            entries=args.entries,
            batch_size=args.batch_size,
            rounds=args.rounds,
            workdir=Path(workdir),
        ):
            print(line, flush=True)
    return 0
