"""Any broker other than Redis and AMQP (SQS ...): Celery's ``send_task`` on one reused
producer. Correct, just not batched: a round trip per message, no front of the queue, and
no audit of what the queue holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import kombu.exceptions

from celery_reconciler.broker import urls, wire


class KombuPublisher:
    """Any other broker: Celery's ``send_task`` on one reused producer."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._app = wire.message_app(url)

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[wire.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
        ahead: bool = False,
    ) -> int:
        # No "front of the queue" through kombu; re-dispatches join the tail (concepts.md).
        soft, hard = time_limits_seconds or (None, None)
        try:
            with self._app.producer_or_acquire() as producer:
                for message in messages:
                    self._app.send_task(
                        task_name,
                        args=[message.entry_id],
                        task_id=message.task_id,
                        queue=queue,
                        time_limit=hard,
                        soft_time_limit=soft,
                        producer=producer,
                    )
        except (kombu.exceptions.KombuError, OSError, ConnectionError) as error:
            raise urls.unavailable(
                error, url=self._url, doing=f"publishing to queue {queue!r}"
            ) from None
        return len(messages)

    def queue_depth(self, queue: str) -> int:
        try:
            with self._app.connection_for_write() as connection:
                _, depth, _ = connection.default_channel.queue_declare(queue=queue, passive=True)
                return int(depth)
        except (kombu.exceptions.KombuError, OSError, ConnectionError) as error:
            raise urls.unavailable(
                error, url=self._url, doing=f"measuring queue {queue!r}"
            ) from None

    def instance_id(self) -> str | None:
        return None  # kombu exposes no server identity for the other transports

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        return None  # kombu cannot list a queue's messages without taking them

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        return None  # nothing to count against: there is no audit (above)

    def close(self) -> None:
        self._app.close()
