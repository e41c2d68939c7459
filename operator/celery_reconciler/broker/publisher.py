"""What ``reconcile`` needs of a broker (``Publisher``), and the transport that serves a
broker URL best (``connect``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from celery_reconciler.broker import (
    amqp_transport,
    kombu_fallback,
    redis_transport,
    urls,
    wire,
)


class Publisher(Protocol):
    """What ``reconcile`` needs from a broker (tests may pass their own)."""

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[wire.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
        ahead: bool = False,
    ) -> int:
        """Publish ``messages``; ``ahead`` puts them before everything already queued (where
        the broker can), for re-dispatches that must run next, not behind the backlog."""
        ...

    def queue_depth(self, queue: str) -> int: ...

    def instance_id(self) -> str | None:
        """Identifies the broker's server process; it changes when the broker restarts (and
        may have forgotten every queued message). ``None`` when the broker cannot tell."""
        ...

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        """Task ids whose message is waiting in ``queue`` or was taken by a consumer within
        the last ``taken_within_seconds`` and not acknowledged yet; ``None`` where the broker
        cannot tell (or the queue is too long to read)."""
        ...

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        """At least as many as ``messages_accounted_for`` would find, read without reading
        the messages (a queue's length is O(1)); ``None`` where the broker cannot tell."""
        ...

    def close(self) -> None: ...


def connect(url: str, *, transport_options: Mapping[str, Any] | None = None) -> Publisher:
    """The fastest correct publisher for ``url``: pipelined on Redis, batched with publisher
    confirms on AMQP, kombu's ``send_task`` otherwise."""
    urls.check_broker_url(url, where=urls.URL_WHERE)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return redis_transport.RedisPublisher(url, transport_options=transport_options)
    if scheme in amqp_transport.AMQP_SCHEMES:
        return amqp_transport.AmqpPublisher(url)
    return kombu_fallback.KombuPublisher(url)
