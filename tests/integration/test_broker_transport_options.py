"""The Redis keys the operator reads and writes are the ones the workers' kombu uses, even
when the app renames them through Celery's ``broker_transport_options``.

kombu lets an app rename its ``unacked`` hash and ``unacked_index`` sorted set, the
separator and the steps of its priority sub-queues, and prefix every key. The operator
publishes onto kombu's lists itself and reads those keys to account for delivered but
unacknowledged messages, so with the defaults it would count a worker's taken messages as
lost (and dispatch them again) and miss the priority sub-queues in the queue's depth. Here a
real kombu consumer, configured with renamed keys, takes one of the operator's messages
from a real Redis; the operator's publisher, given the same options, must still find it —
and a sweep of a policy that names those options (``spec.task.brokerTransportOptions``) leaves
that message alone instead of dispatching its entry again.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import psycopg
import pytest
import redis
from test_cli_sweep import write_policy

from celery_app.demo import schema, settings
from celery_reconciler import broker, cli, reconcile

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


def test_a_sweep_leaves_alone_a_message_a_worker_took_under_the_apps_keys(
    tmp_path: Path, demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str
) -> None:
    """The sweep runs in this process (``celery-reconciler sweep``'s own function), so the
    message it looks for was taken moments before, as a live worker's would be."""
    schema.seed(conn, count=3)
    spec = schema.policy_spec()
    spec["task"]["brokerTransportOptions"] = RENAMED
    sweep = ["sweep", "--policy", str(write_policy(tmp_path / "policy.yaml", **spec))]
    sweep += ["--dsn", demo_dsn, "--broker", redis_url]
    assert cli.main(sweep, out=io.StringIO()) == 0
    queue_key = f"{RENAMED['global_keyprefix']}{settings.QUEUE}"
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue_key) == 3
    # Queued for longer than a live worker takes to start a body: a sweep now accounts for
    # each of these entries' messages, in the queue or taken.
    time.sleep(reconcile.STRANDED_DELIVERY_SECONDS + 0.5)

    with kombu.Connection(redis_url, transport_options=RENAMED) as consuming:
        taken = consuming.SimpleQueue(settings.QUEUE).get(timeout=10)
        swept = io.StringIO()
        assert cli.main(sweep, out=swept) == 0
        assert "dispatched 0 entries" in swept.getvalue(), swept.getvalue()
        still_fenced = conn.execute(
            "SELECT count(*) FROM celery_reconciler.entries WHERE fence_token = %s",
            [taken.headers["id"]],
        ).fetchone()
        assert still_fenced == (1,)
        assert client.llen(queue_key) == 2
