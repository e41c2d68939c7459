"""Our messages are what ``send_task`` would have sent, for a stock worker, on either broker.

Two proofs: the raw messages in the broker have the same shape (headers, properties, body:
the envelopes in Redis's list; on RabbitMQ, what ``basic_get`` delivers),
and a stock ``celery worker`` with no celery-reconciler code consumes both the same way —
same request fields, task id = fence token, and Celery's own retry works on them.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import celery
import kombu.serialization
import psycopg
import pytest
import redis
from reconcile_support import WorkerFactory, wait_for

from celery_reconciler import broker

pytestmark = pytest.mark.integration

PROBE_DIRECTORY = Path(__file__).resolve().parent
QUEUE = "probe"
TIME_LIMITS = (8.0, 9.0)  # (soft, hard)


def envelope_shape(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    body = json.loads(base64.b64decode(message["body"]))
    headers = dict(message["headers"])
    for varying in ("id", "root_id", "origin"):
        assert headers.pop(varying)
    properties = dict(message["properties"])
    for varying in ("correlation_id", "delivery_tag", "reply_to"):
        assert properties.pop(varying)
    return {
        "keys": sorted(message),
        "content": (message["content-type"], message["content-encoding"]),
        "headers": headers,
        "properties": properties,
        "body": body,
    }


def amqp_shape(message: Any) -> dict[str, Any]:
    """A message as RabbitMQ delivers it (``basic_get``), without what varies per send."""
    properties = dict(message.properties)
    headers = dict(properties.pop("application_headers"))
    for varying in ("id", "root_id", "origin"):
        assert headers.pop(varying)
    for varying in ("correlation_id", "reply_to"):
        assert properties.pop(varying)
    return {
        "headers": headers,
        "properties": properties,
        "routing": (message.delivery_info["exchange"], message.delivery_info["routing_key"]),
        "body": message.body,
    }


def test_our_messages_match_send_task_for_a_stock_worker(
    database_dsn: str, broker_url: str, start_worker: WorkerFactory
) -> None:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE probe_runs (task_id text, entry_id text, seen jsonb, "
            "at timestamptz DEFAULT clock_timestamp())"
        )
    ours_id, theirs_id = str(uuid.uuid4()), str(uuid.uuid4())

    publisher = broker.connect(broker_url)
    try:
        expected = broker.RedisPublisher if broker_url.startswith("redis") else broker.AmqpPublisher
        assert isinstance(publisher, expected)
        publisher.publish(
            task_name="probe.record",
            queue=QUEUE,
            messages=[broker.TaskMessage(entry_id="42", task_id=ours_id)],
            time_limits_seconds=TIME_LIMITS,
        )
        assert publisher.queue_depth(QUEUE) == 1
    finally:
        publisher.close()
    app = celery.Celery("sender", broker=broker_url, set_as_current=False)
    app.send_task(
        "probe.record",
        args=["42"],
        task_id=theirs_id,
        queue=QUEUE,
        soft_time_limit=TIME_LIMITS[0],
        time_limit=TIME_LIMITS[1],
    )

    if isinstance(publisher, broker.RedisPublisher):
        client = redis.Redis.from_url(broker_url)
        theirs_raw, ours_raw = client.lrange(QUEUE, 0, 1)  # LPUSH: newest first
        assert json.loads(ours_raw)["headers"]["id"] == ours_id
        assert envelope_shape(ours_raw) == envelope_shape(theirs_raw)
        ours_body = base64.b64decode(json.loads(ours_raw)["body"])
    else:
        # Take both out to compare them (no ack: they go back to the queue, in order).
        with app.connection_for_write() as connection:
            channel = connection.channel()
            ours_message = channel.basic_get(QUEUE, no_ack=False)
            theirs_message = channel.basic_get(QUEUE, no_ack=False)
            assert ours_message.properties["application_headers"]["id"] == ours_id
            assert amqp_shape(ours_message) == amqp_shape(theirs_message)
            # py-amqp hands out a utf-8 body decoded; the bytes on the wire are its encoding.
            ours_body = ours_message.body.encode("utf-8")
            channel.close()
        assert publisher.queue_depth(QUEUE) == 2  # both back in the queue
    app.close()
    # Our body bytes are exactly what kombu's json serializer writes for the same body.
    _, _, kombu_body = kombu.serialization.dumps(json.loads(ours_body), serializer="json")
    assert ours_body == (kombu_body.encode() if isinstance(kombu_body, str) else kombu_body)

    start_worker(
        broker_url=broker_url,
        dsn=database_dsn,
        app="celery_probe",
        queue=QUEUE,
        concurrency=1,
        extra_env={"PYTHONPATH": str(PROBE_DIRECTORY), "PROBE_DSN": database_dsn},
    )
    with psycopg.connect(database_dsn, autocommit=True) as conn:

        def runs() -> list[tuple[str, dict[str, Any]]]:
            return conn.execute("SELECT task_id, seen FROM probe_runs ORDER BY at").fetchall()

        wait_for(lambda: len(runs()) == 4, timeout_seconds=30, what="2 runs + 2 retries")
        by_task: dict[str, list[dict[str, Any]]] = {}
        for task_id, seen in runs():
            by_task.setdefault(task_id, []).append(seen)

    assert set(by_task) == {ours_id, theirs_id}  # task id = the id we chose (fence token)
    assert by_task[ours_id] == by_task[theirs_id]
    first, retried = by_task[ours_id]
    assert first["retries"] == 0 and retried["retries"] == 1  # Celery's retry re-sent ours
    assert first["args"] == ["42"] and first["timelimit"] == [TIME_LIMITS[1], TIME_LIMITS[0]]
    assert first["delivery_info"]["routing_key"] == QUEUE
    assert first["root_id_is_id"] and first["correlation_id_is_id"]
