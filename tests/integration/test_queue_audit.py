"""The lost-message audit on Redis: a sweep reads the queue's whole list only when something
suggests a message was lost, and a queue that lost messages is still found out.

A steady backlog (``maxInFlight`` queued, slots freeing one at a time) must not cost a read
of every queued message per sweep (issue 25). What may lose a message, and what each test
here proves is still caught, with the same real Redis and PostgreSQL the operator uses:
the queue's list gone (a ``DEL``, an eviction, ``celery purge``), and a single message gone
while another message takes its place in the count (found at the audit interval).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
import redis
from reconcile_support import make_policy, sweep_connections

from celery_app.demo import schema
from celery_reconciler import broker, policy, reconcile

pytestmark = pytest.mark.integration

QUEUE = "insights"


class AuditCounter:
    """The real publisher, counting how often a sweep read the queue in full."""

    def __init__(self, inner: broker.Publisher) -> None:
        self.inner = inner
        self.full_reads = 0

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[broker.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
        ahead: bool = False,
    ) -> int:
        return self.inner.publish(
            task_name=task_name,
            queue=queue,
            messages=messages,
            time_limits_seconds=time_limits_seconds,
            ahead=ahead,
        )

    def queue_depth(self, queue: str) -> int:
        return self.inner.queue_depth(queue)

    def instance_id(self) -> str | None:
        return self.inner.instance_id()

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        self.full_reads += 1
        return self.inner.messages_accounted_for(queue, taken_within_seconds=taken_within_seconds)

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        return self.inner.messages_held(queue, taken_within_seconds=taken_within_seconds)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def steady(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str
) -> Iterator[tuple[policy.Policy, reconcile.Database, AuditCounter]]:
    """A backlog of 300 with 200 in flight, queued for longer than a delivery takes."""
    schema.seed(conn, count=300)
    policy_ = make_policy(lease_timeout="10m", limits={"batchSize": 50, "maxInFlight": 200})
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        counter = AuditCounter(publisher)
        assert reconcile.reconcile_once(policy_, db=db, broker=counter).published == 200
        age_dispatches(conn, seconds=10)
        yield policy_, db, counter


def age_dispatches(conn: psycopg.Connection[Any], *, seconds: float) -> None:
    """As if the queued entries were published ``seconds`` ago (instead of waiting)."""
    conn.execute(
        "UPDATE celery_reconciler.entries "
        "SET dispatched_at = dispatched_at - make_interval(secs => %s) WHERE state = 'queued'",
        [seconds],
    )


def later(seconds: float) -> Callable[[], float]:
    return lambda: time.monotonic() + seconds


def queued_task_ids(client: redis.Redis) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, -1)]


def test_a_steady_sweep_reads_the_queue_only_once_per_audit_interval(
    steady: tuple[policy.Policy, reconcile.Database, AuditCounter],
) -> None:
    policy_, db, counter = steady
    first = reconcile.reconcile_once(policy_, db=db, broker=counter)
    assert first.missing_messages == 0
    assert counter.full_reads == 1  # the first look of this process reads it all
    for _ in range(3):
        assert reconcile.reconcile_once(policy_, db=db, broker=counter).missing_messages == 0
    assert counter.full_reads == 1  # every message is there: nothing to look for
    due = reconcile.reconcile_once(
        policy_, db=db, broker=counter, clock=later(reconcile.QUEUE_AUDIT_INTERVAL_SECONDS + 1)
    )
    assert due.missing_messages == 0
    assert counter.full_reads == 2


def test_a_queue_redis_lost_is_found_and_dispatched_again_at_the_next_sweep(
    steady: tuple[policy.Policy, reconcile.Database, AuditCounter],
    conn: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    policy_, db, counter = steady
    assert reconcile.reconcile_once(policy_, db=db, broker=counter).missing_messages == 0
    client = redis.Redis.from_url(redis_url)
    lost = set(queued_task_ids(client))
    assert len(lost) == 200
    client.delete(QUEUE)  # no restart: the server identity stays the same

    found = reconcile.reconcile_once(policy_, db=db, broker=counter)

    assert found.missing_messages == 200
    again = set(queued_task_ids(client))
    assert len(again) == 200 and not again & lost  # new fence tokens, every one
    tokens = {
        row[0]
        for row in conn.execute(
            "SELECT fence_token::text FROM celery_reconciler.entries WHERE state = 'queued'"
        )
    }
    assert tokens == again


def test_a_lost_message_another_message_hides_is_found_at_the_audit_interval(
    steady: tuple[policy.Policy, reconcile.Database, AuditCounter],
    redis_url: str,
) -> None:
    """A consumer popped one message and died before recording it (kombu pops, then writes
    its ``unacked`` hash), while another app's message joined the queue: the counts match,
    so only the periodic full read can tell."""
    policy_, db, counter = steady
    assert reconcile.reconcile_once(policy_, db=db, broker=counter).missing_messages == 0
    client = redis.Redis.from_url(redis_url)
    popped = client.rpop(QUEUE)
    assert isinstance(popped, bytes)
    lost = json.loads(popped)["headers"]["id"]
    foreign = json.loads(popped)
    foreign["headers"] = {**foreign["headers"], "id": "another-apps-task"}
    client.lpush(QUEUE, json.dumps(foreign))

    found = reconcile.reconcile_once(
        policy_, db=db, broker=counter, clock=later(reconcile.QUEUE_AUDIT_INTERVAL_SECONDS + 1)
    )

    assert found.missing_messages == 1
    assert lost not in queued_task_ids(client)
