"""The Redis keys the operator reads and writes are the ones the workers' kombu uses, even
when the app renames them through Celery's ``broker_transport_options``.

kombu lets an app rename its ``unacked`` hash and ``unacked_index`` sorted set, the
separator and the steps of its priority sub-queues, and prefix every key. The operator
publishes onto kombu's lists itself and reads those keys to account for delivered but
unacknowledged messages, so with the defaults it would count a worker's taken messages as
lost (and dispatch them again) and miss the priority sub-queues in the queue's depth. Here a
real kombu consumer, configured with renamed keys, takes one of the operator's messages
from a real Redis; the operator's publisher, given the same options, must still find it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis

from celery_reconciler import broker

pytestmark = pytest.mark.integration

RENAMED: dict[str, Any] = {
    "global_keyprefix": "app-one:",
    "unacked_key": "app_one_unacked",
    "unacked_index_key": "app_one_unacked_index",
    "sep": "::",
    "priority_steps": [0, 5, 9],
}


@pytest.fixture
def publisher(redis_url: str) -> Iterator[broker.Publisher]:
    publisher = broker.connect(redis_url, transport_options=RENAMED)
    try:
        yield publisher
    finally:
        publisher.close()


def test_messages_a_worker_took_are_found_under_the_apps_renamed_keys(
    redis_url: str, publisher: broker.Publisher
) -> None:
    queue = f"renamed-{uuid.uuid4().hex[:8]}"
    messages = [broker.TaskMessage(entry_id=str(n), task_id=str(uuid.uuid4())) for n in (1, 2)]
    assert (
        publisher.publish(
            task_name="probe.renamed", queue=queue, messages=messages, time_limits_seconds=None
        )
        == 2
    )
    client = redis.Redis.from_url(redis_url)
    prefix = RENAMED["global_keyprefix"]
    with kombu.Connection(redis_url, transport_options=RENAMED) as producing:
        # A message of another producer in a priority sub-queue: part of the queue's depth.
        producing.SimpleQueue(queue).put({"from": "another producer"}, priority=9)
    assert client.llen(f"{prefix}{queue}::9") == 1

    with kombu.Connection(redis_url, transport_options=RENAMED) as consuming:
        worker_queue = consuming.SimpleQueue(queue)  # acknowledges nothing, like acks_late
        taken = worker_queue.get(timeout=10)
        # kombu itself keeps the taken message under the app's names, not the defaults.
        assert client.hlen(f"{prefix}{RENAMED['unacked_key']}") == 1
        assert client.zcard(f"{prefix}{RENAMED['unacked_index_key']}") == 1
        assert not client.exists(f"{prefix}unacked", "unacked")

        accounted = publisher.messages_accounted_for(queue, taken_within_seconds=300)
        assert accounted == {message.task_id for message in messages}
        assert taken.headers["id"] in accounted
        # One of ours still waits, plus the other producer's in the priority sub-queue.
        assert publisher.queue_depth(queue) == 2
        taken.ack()
