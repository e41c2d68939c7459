"""Publishing straight onto kombu's Redis lists: a batch in one pipelined round trip.

Why not ``app.send_task`` in a loop: it costs one broker round trip per message, even on a
reused producer (``make bench`` prints its rate beside ours), which makes dispatching a
large backlog slow. Here the batch's envelopes (``wire.MessageBuilder``) are ``LPUSH``ed
onto the queue's list in one pipelined round trip — the list and the command kombu's Redis
transport uses in ``Channel._put`` for priority 0. A stock ``celery worker`` cannot tell
these messages from ``send_task`` ones (an integration test proves it on headers, retries
and task id).

Re-dispatches (rescues, due retries) are published *ahead* of the backlog (``RPUSH`` to the
end kombu pops), so rescued work runs next instead of last. The queue's list and kombu's
``unacked`` hash are also read back, to account for the messages of a policy's entries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import redis.exceptions

from celery_reconciler.broker import urls, wire

# kombu's Redis transport: priority steps and the separator of priority sub-queues, unless the
# app's broker_transport_options change them (RedisPublisher's transport_options).
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_PRIORITY_SEPARATOR = "\x06\x16"
# Values per LPUSH command inside the one pipeline: bounds a single command's size.
LPUSH_CHUNK = 1000
# Above this many waiting messages a sweep does not read the whole queue to account for its
# entries' messages (the lease stays the backstop for lost ones).
AUDIT_QUEUE_LIMIT = 50_000


def _task_id(raw: bytes, *, taken: bool) -> str | None:
    """The Celery task id of a kombu envelope as the queue's list holds it, or as the
    ``unacked`` hash does (``[envelope, exchange, routing_key]``); ``None`` for anything
    else."""
    try:
        envelope = json.loads(raw)
        return str((envelope[0] if taken else envelope)["headers"]["id"])
    except (ValueError, LookupError, TypeError):
        return None


class RedisPublisher:
    """Pipelined publishing straight onto kombu's Redis lists."""

    def __init__(
        self,
        url: str,
        *,
        transport_options: Mapping[str, Any] | None = None,
        socket_timeout_seconds: float = 30.0,
    ) -> None:
        self._url = url
        self._builder = wire.MessageBuilder(wire.message_app(url))
        # The workers' kombu names its keys after the app's broker_transport_options; the
        # defaults below are kombu's own.
        options = transport_options or {}
        self._key_prefix = str(options.get("global_keyprefix") or "")
        self._unacked_key = self._key_prefix + str(options.get("unacked_key") or "unacked")
        self._unacked_index_key = self._key_prefix + str(
            options.get("unacked_index_key") or "unacked_index"
        )
        self._priority_separator = str(options.get("sep") or REDIS_PRIORITY_SEPARATOR)
        self._priority_steps = tuple(options.get("priority_steps") or REDIS_PRIORITY_STEPS)
        try:
            self._client: redis.Redis[bytes] = redis.Redis.from_url(
                url,
                socket_connect_timeout=5,
                socket_timeout=socket_timeout_seconds,
            )
        except ValueError:
            raise urls.BrokerUrlInvalid(
                urls.URL_WHERE + " is not a Redis URL (its content is not shown)"
            ) from None

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[wire.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
        ahead: bool = False,
    ) -> int:
        if not messages:
            return 0
        payloads = self._builder.envelopes_json(
            task_name=task_name,
            queue=queue,
            messages=messages,
            time_limits_seconds=time_limits_seconds,
        )
        key = self._key_prefix + queue
        if ahead:
            # kombu's worker pops the list's right end (BRPOP): RPUSH lands next in line;
            # reversed, so the first of ``messages`` is the first to run.
            payloads.reverse()
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(payloads), LPUSH_CHUNK):
                    chunk = payloads[start : start + LPUSH_CHUNK]
                    if ahead:
                        pipe.rpush(key, *chunk)
                    else:
                        pipe.lpush(key, *chunk)
                pipe.execute()
        except redis.exceptions.RedisError as error:
            raise urls.unavailable(
                error, url=self._url, doing=f"publishing to queue {queue!r}"
            ) from None
        return len(payloads)

    def queue_depth(self, queue: str) -> int:
        keys = [
            self._key_prefix + (queue if step == 0 else f"{queue}{self._priority_separator}{step}")
            for step in self._priority_steps
        ]
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                sizes = pipe.execute()
        except redis.exceptions.RedisError as error:
            raise urls.unavailable(
                error, url=self._url, doing=f"measuring queue {queue!r}"
            ) from None
        return sum(int(size) for size in sizes)

    def instance_id(self) -> str | None:
        try:
            server = self._client.info("server")
        except redis.exceptions.RedisError as error:
            raise urls.unavailable(
                error, url=self._url, doing="asking the broker who it is"
            ) from None
        run_id = server.get("run_id")
        return None if run_id is None else str(run_id)

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        """The queue's list, plus kombu's ``unacked`` hash of delivered, unacknowledged
        messages indexed by delivery time (the consumer's clock) in ``unacked_index`` (both
        as the app names them)."""
        key = self._key_prefix + queue
        recent = time.time() - taken_within_seconds
        try:
            if self._client.llen(key) > AUDIT_QUEUE_LIMIT:
                return None
            with self._client.pipeline(transaction=False) as pipe:
                pipe.lrange(key, 0, -1)
                pipe.zrangebyscore(self._unacked_index_key, recent, "+inf")
                waiting, tags = pipe.execute()
            taken = self._client.hmget(self._unacked_key, tags) if tags else []
        except redis.exceptions.RedisError as error:
            raise urls.unavailable(error, url=self._url, doing=f"reading queue {queue!r}") from None
        found = {_task_id(raw, taken=False) for raw in waiting}
        found.update(_task_id(raw, taken=True) for raw in taken if raw is not None)
        return {task_id for task_id in found if task_id is not None}

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        """The queue's length plus the deliveries taken within ``taken_within_seconds``: the
        list and the index ``messages_accounted_for`` reads, counted, not read."""
        recent = time.time() - taken_within_seconds
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.llen(self._key_prefix + queue)
                pipe.zcount(self._key_prefix + "unacked_index", recent, "+inf")
                waiting, taken = pipe.execute()
        except redis.exceptions.RedisError as error:
            raise urls.unavailable(
                error, url=self._url, doing=f"measuring queue {queue!r}"
            ) from None
        return int(waiting) + int(taken)

    def close(self) -> None:
        self._client.close()
