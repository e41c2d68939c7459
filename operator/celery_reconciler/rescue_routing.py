"""Which queue a re-dispatch goes to on RabbitMQ: the rescue queue, or the queue's tail.

Re-dispatches (rescues, due retries, lost messages) must run next, not behind the backlog.
An AMQP queue has no front to publish to, so the workers consume a second queue beside
theirs, ``<queue>.rescue`` (``celery_reconciler_worker.rescue_queue`` explains why a second
queue rather than a priority), and the operator publishes re-dispatches there.

But a rescue queue nobody reads would hold work until its lease ran out — and the re-dispatch
after the lease would go there again. So the choice is made at each publish from what the
broker says now (a passive declaration answers with the number of consumers):

* the rescue queue does not exist: no worker with the rescue queue ever ran — the tail;
* some worker consumes it: the rescue queue;
* nobody consumes it, but nobody consumes the queue itself either (the only worker is
  restarting, workers scaled to zero): the rescue queue — whichever worker comes next reads
  both, and a worker of an older release that reads only the queue leaves the message to its
  lease, whose re-dispatch then finds that worker consuming and goes to the tail;
* nobody consumes it while workers consume the queue (they run an older release): the tail.

Pure: the broker's answers come in as a function (``broker.AmqpPublisher`` asks and publishes).
"""

from __future__ import annotations

from collections.abc import Callable

from celery_reconciler_worker import rescue_queue


def queue_for_redispatch(*, queue: str, consumers: Callable[[str], int | None]) -> str:
    """The queue to publish ``queue``'s re-dispatches to; ``consumers(name)`` is how many
    consumers the broker says a queue has now, ``None`` when there is no such queue."""
    rescue = rescue_queue.rescue_queue_name(queue)
    rescue_consumers = consumers(rescue)
    if rescue_consumers is None:
        return queue
    if rescue_consumers > 0 or not consumers(queue):
        return rescue
    return queue
