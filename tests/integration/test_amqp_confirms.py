"""Publisher confirms on a real RabbitMQ: a publish the broker did not take never passes.

The broker itself refuses here — a queue full with ``x-overflow: reject-publish`` nacks,
a deleted queue returns ``mandatory`` messages — and the publish must raise
``BrokerUnavailable`` (so ``reconcile`` releases the page's claims), never return as if
the messages were queued. The shared tests (``broker_url``) cover the rest on both brokers.
"""

from __future__ import annotations

import uuid
from typing import Any

import celery
import pytest

from celery_reconciler import broker

pytestmark = pytest.mark.integration

QUEUE = "insights"


def messages(count: int) -> list[broker.TaskMessage]:
    return [
        broker.TaskMessage(entry_id=str(number), task_id=str(uuid.uuid4()))
        for number in range(count)
    ]


def publish(publisher: broker.Publisher, count: int) -> int:
    return publisher.publish(
        task_name="insights.tasks.extract_insights_task",
        queue=QUEUE,
        messages=messages(count),
        time_limits_seconds=None,
    )


def with_channel(url: str, action: Any) -> None:
    app = celery.Celery("admin", broker=url, set_as_current=False)
    try:
        with app.connection_for_write() as connection:
            channel = connection.channel()
            action(channel)
            channel.close()
    finally:
        app.close()


def test_messages_the_broker_nacks_fail_the_publish(amqp_url: str) -> None:
    """The workers' queue holds at most 5 and rejects publishes beyond: RabbitMQ nacks them.
    It was declared with arguments of its own, which our declaration must accept too."""
    with_channel(
        amqp_url,
        lambda channel: channel.queue_declare(
            queue=QUEUE,
            durable=True,
            auto_delete=False,
            arguments={"x-max-length": 5, "x-overflow": "reject-publish"},
        ),
    )
    publisher = broker.connect(amqp_url)
    try:
        assert publish(publisher, 5) == 5
        with pytest.raises(broker.BrokerUnavailable) as caught:
            publish(publisher, 3)
        assert "nacked" in str(caught.value)
        assert publisher.queue_depth(QUEUE) == 5
    finally:
        publisher.close()


def test_a_message_no_queue_takes_fails_the_publish_and_the_queue_is_declared_again(
    amqp_url: str,
) -> None:
    publisher = broker.connect(amqp_url)
    try:
        assert publish(publisher, 3) == 3
        with_channel(amqp_url, lambda channel: channel.queue_delete(queue=QUEUE))
        # The publisher declared the queue once per connection and goes on publishing to
        # it: RabbitMQ returns the unroutable messages instead of confirming them away.
        with pytest.raises(broker.BrokerUnavailable) as caught:
            publish(publisher, 2)
        assert "no queue took a message routed to 'insights'" in str(caught.value)
        assert publish(publisher, 4) == 4  # declared again, on a fresh connection
        assert publisher.queue_depth(QUEUE) == 4
    finally:
        publisher.close()
