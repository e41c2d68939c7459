"""The rescue queue: on RabbitMQ, where rescued work waits, so it runs next and not last.

A rescued entry (its worker died, its retry is due, its message was lost) has waited once
already. On Redis the operator pushes its message onto the end of the list the workers pop,
ahead of the backlog. An AMQP queue has no such end: a message joins the tail, behind up to
``maxInFlight`` others. So on RabbitMQ the operator publishes re-dispatches to a second
queue, ``<queue>.rescue``, and every worker that consumes ``<queue>`` consumes it too.

Why a second queue and not a priority (``x-max-priority``) on the workers' queue: a queue's
arguments are fixed when it is created, and every party that declares it must declare the
same ones or be refused (``PRECONDITION_FAILED``): the workers, the operator (which creates
the queue when it publishes first) and every producer of the user's app. Turning priorities
on would mean deleting and recreating each existing queue; a second queue leaves the
existing one as it is, needs no change to anyone else's declaration, and works for classic
and quorum queues alike. A worker's prefetch is shared by the queues it consumes (Celery
asks RabbitMQ for a channel-wide limit), so as soon as a pool process is free either queue
may deliver to it, and the rescue queue holds only the few rescued messages.

``worker_prefetch_multiplier=1`` (``recommended_settings``) keeps what a worker already holds
— and what a rescued message may still wait behind — to one message per pool process.

Importing this module (``reliable`` does) makes every worker started with ``-Q q1,q2`` on an
AMQP broker consume ``q1.rescue`` and ``q2.rescue`` as well. The operator sends to a rescue
queue only while some worker consumes it, or while nobody consumes the queue itself either,
so workers without this module are never left with work they do not read.
"""

from __future__ import annotations

from typing import Any

import celery.signals

RESCUE_QUEUE_SUFFIX = ".rescue"
AMQP_DRIVER_TYPE = "amqp"
# AMQP names a queue with a short string: a queue whose rescue queue could not be named goes
# without one (its re-dispatches join its tail) rather than stop the worker.
AMQP_NAME_MAX_BYTES = 255


def rescue_queue_name(queue: str) -> str:
    """The queue the operator re-dispatches ``queue``'s rescued work to on RabbitMQ."""
    return f"{queue}{RESCUE_QUEUE_SUFFIX}"


def _consume_rescue_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """After ``-Q`` was applied: consume each selected queue's rescue queue too (AMQP only:
    on Redis rescued messages go to the front of the queue itself)."""
    if instance is None:
        return
    app = instance.app
    connection = app.connection_for_read()
    try:
        driver_type = connection.transport.driver_type
    finally:
        connection.release()
    if driver_type != AMQP_DRIVER_TYPE:
        return
    queues = app.amqp.queues
    for name in list(queues.consume_from):
        rescue = rescue_queue_name(name)
        if not name.endswith(RESCUE_QUEUE_SUFFIX) and len(rescue.encode()) <= AMQP_NAME_MAX_BYTES:
            queues.select_add(rescue)


celery.signals.celeryd_after_setup.connect(_consume_rescue_queues, weak=False)
