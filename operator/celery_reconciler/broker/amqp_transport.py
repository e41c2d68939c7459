"""Publishing to RabbitMQ (``amqp://``, ``amqps://``, ``pyamqp://``) in batches, with
publisher confirms, on one py-amqp channel.

``AmqpPublisher`` sends the same protocol-2 messages (headers, properties and JSON body from
the same template, as ``send_task`` would publish them) in **publisher-confirm** mode, and
returns only once the broker confirmed every message of the page. Why not kombu's
``confirm_publish`` transport option: it waits for each message's ack before sending the
next: a round trip per message, a fraction of the unconfirmed rate (``make bench`` measures
both). Instead the channel publishes a window of ``CONFIRM_WINDOW`` messages in one socket
write, then reads acks until every delivery tag of the window is confirmed. The window's
frames are spliced from a template serialized once by py-amqp (``AmqpFrames``): py-amqp's
per-message property serialization was most of a publish's cost. Nothing can be lost silently:

* a ``basic.nack``, a confirm that does not come within the timeout, or a lost connection
  raises ``BrokerUnavailable`` for the whole page, and ``reconcile`` releases its claims (a
  message of the page that did reach the queue is then a duplicate the fence drops);
* messages go out ``mandatory``: one that no queue takes (the queue was deleted) comes back
  as ``basic.return`` and fails the page, instead of being confirmed and dropped;
* the queue is declared first exactly as Celery declares it (durable, from the app's queue
  settings), and messages are persistent, so RabbitMQ confirms them once they are on disk
  and they survive a broker restart.

AMQP has no front of the queue: ``ahead`` re-dispatches go to the rescue queue the workers
consume beside theirs, when they do (``rescue_routing``), else they join the tail.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import amqp.basic_message
import amqp.serialization
import amqp.spec
import kombu.exceptions

from celery_reconciler import rescue_routing
from celery_reconciler.broker import urls, wire

FRAME_END = b"\xce"


class AmqpFrames:
    """The wire bytes of one ``basic.publish`` (method, content header and body frames) for
    a template's messages, spliced per message instead of serialized by py-amqp.

    py-amqp serializes the properties table of every message item by item in Python: two
    thirds of a publish's cost. Here the properties are serialized once, by py-amqp itself,
    for a sample whose task id is a fresh UUID and whose ``argsrepr`` is a sentinel; per
    message the task id (the same length: fence tokens are UUIDs) is substituted and the
    ``argsrepr`` long string spliced in, with the headers table's length prefix adjusted. A
    unit test compares the result with py-amqp's own serialization on awkward ids.
    """

    def __init__(
        self,
        *,
        template: wire.AmqpTemplate,
        queue: str,
        channel_id: int,
        frame_max: int,
    ) -> None:
        self._template = template
        self._channel_id = channel_id
        self._frame_max = frame_max
        sample_task = str(uuid.uuid4())
        sample_args = f"cr{uuid.uuid4().hex}args"
        body, headers, properties = template.fill(
            wire.TaskMessage(entry_id="0", task_id=sample_task)
        )
        headers["argsrepr"] = sample_args
        serialized = amqp_message(body, headers, properties)._serialize_properties()
        args = sample_args.encode("utf-8")
        at = serialized.index(args)
        # flags (one 16-bit word), content_type and content_encoding shortstrs, then the
        # headers table: a 32-bit length and its entries ('S' + 32-bit length + bytes each).
        table_at = 2 + 1 + len("application/json") + 1 + len("utf-8")
        if (
            serialized.count(args) != 1
            or serialized[at - 5 : at] != b"S" + struct.pack(">I", len(args))
            or not table_at + 4 < at
        ):
            raise AssertionError("the properties do not have the layout the splice expects")
        self._table_length = struct.unpack(">I", serialized[table_at : table_at + 4])[0]
        self._sample_args_length = len(args)
        self._task = sample_task.encode("ascii")
        self._head = serialized[:table_at]
        self._middle = serialized[table_at + 4 : at - 4]
        self._tail = serialized[at + len(args) :]
        method = struct.pack(">HH", *amqp.spec.Basic.Publish) + amqp.serialization.dumps(
            "Bssbb", (0, "", queue, True, False)
        )
        self._method_frame = struct.pack(">BHI", 1, channel_id, len(method)) + method + FRAME_END

    def properties(self, message: wire.TaskMessage) -> bytes | None:
        """The serialized properties of ``message``; ``None`` where the splice does not
        apply (a task id that is not a UUID's 36 ASCII characters)."""
        task = message.task_id.encode("utf-8")
        if len(task) != len(self._task) or len(message.entry_id) > wire.SHORT_ID_LENGTH:
            return None
        args = repr([message.entry_id]).encode("utf-8")
        return b"".join(
            (
                self._head,
                struct.pack(">I", self._table_length + len(args) - self._sample_args_length),
                self._middle,
                struct.pack(">I", len(args)),
                args,
                self._tail,
            )
        ).replace(self._task, task)

    def frames(self, message: wire.TaskMessage) -> bytes | None:
        """Method, header and body frames of ``message``, or ``None`` (publish it through
        py-amqp) where the splice does not apply or the body needs more than one frame."""
        properties = self.properties(message)
        if properties is None:
            return None
        body = self._template.body(message)
        header = struct.pack(">HHQ", amqp.spec.Basic.Publish[0], 0, len(body)) + properties
        if len(header) + len(body) + 64 > self._frame_max:
            return None
        channel_id = self._channel_id
        return b"".join(
            (
                self._method_frame,
                struct.pack(">BHI", 2, channel_id, len(header)),
                header,
                FRAME_END,
                struct.pack(">BHI", 3, channel_id, len(body)),
                body,
                FRAME_END,
            )
        )


def amqp_message(body: bytes, headers: dict[str, Any], properties: dict[str, Any]) -> Any:
    """The py-amqp message kombu's ``Channel.prepare_message`` makes of these parts."""
    return amqp.basic_message.Message(
        body,
        priority=AMQP_PRIORITY,
        content_type="application/json",
        content_encoding="utf-8",
        application_headers=headers,
        **properties,
    )


# Messages published between two waits for their confirms: bounds what a failure leaves
# unconfirmed (to be released and re-dispatched) and how many acks queue up unread.
CONFIRM_WINDOW = 1000
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
NOT_FOUND, PRECONDITION_FAILED = 404, 406
# What send_task's publish sets on AMQP (kombu's Producer default), priority queue or not.
AMQP_PRIORITY = 0
_T = TypeVar("_T")


class _Unconfirmed(Exception):
    """The broker nacked or returned a message of the batch (it did not take it)."""


class AmqpPublisher:
    """Batched publishing with publisher confirms on one py-amqp channel (RabbitMQ)."""

    def __init__(self, url: str, *, confirm_timeout_seconds: float = 30.0) -> None:
        self._url = url
        self._app = wire.message_app(url)
        self._builder = wire.MessageBuilder(self._app)
        self._confirm_timeout_seconds = confirm_timeout_seconds
        # reconcile publishes from its page thread while the loop asks for depth from
        # another: a py-amqp connection is not thread-safe, so every use holds this lock.
        self._lock = threading.Lock()
        self._connection: Any = None  # a kombu Connection over py-amqp
        self._channel: Any = None
        self._declared: set[str] = set()
        # Confirm delivery tags count 1, 2, ... per channel: everything up to
        # ``_confirmed_through`` is confirmed, plus the single acks beyond it.
        self._next_tag = 1
        self._confirmed_through = 0
        self._confirmed_beyond: set[int] = set()
        self._refused: list[str] = []
        self._frame_templates: dict[tuple[str, str, tuple[float, float] | None], AmqpFrames] = {}
        transport = self._app.connection_for_write()
        self._channel_errors: tuple[type[BaseException], ...] = tuple(transport.channel_errors)
        self._errors: tuple[type[BaseException], ...] = (
            *transport.connection_errors,
            *self._channel_errors,
            OSError,
            kombu.exceptions.KombuError,
            _Unconfirmed,
        )
        transport.release()

    # -- connection and channel -------------------------------------------------------------

    def _open_channel(self) -> Any:
        if self._connection is None:
            connection = self._app.connection_for_write(
                connect_timeout=5,
                transport_options={
                    "read_timeout": self._confirm_timeout_seconds,
                    "write_timeout": self._confirm_timeout_seconds,
                },
            )
            connection.connect()
            self._connection = connection
            self._declared.clear()
        if self._channel is None or not self._channel.is_open:
            channel = self._connection.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            self._channel = channel
            self._frame_templates.clear()  # they carry the channel's id
            self._next_tag = 1
            self._confirmed_through = 0
            self._confirmed_beyond.clear()
            self._refused.clear()
        return self._channel

    def _drop_connection(self) -> None:
        """Forget a connection whose state is unknown after an error; the next call opens a
        fresh one (a channel with unconfirmed publishes must never be trusted again)."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
        # Closing reads what the broker still sent (more returns of the failed batch).
        self._refused.clear()

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._confirmed_through = max(self._confirmed_through, delivery_tag)
        else:
            self._confirmed_beyond.add(delivery_tag)
        while self._confirmed_through + 1 in self._confirmed_beyond:
            self._confirmed_through += 1
            self._confirmed_beyond.discard(self._confirmed_through)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._refused.append("the broker refused (nacked) a message")
        self._on_ack(delivery_tag, multiple)

    def _on_return(self, error: Exception, exchange: str, routing_key: str, _: Any) -> None:
        self._refused.append(f"no queue took a message routed to {routing_key!r} ({error})")
        self._declared.discard(routing_key)

    def _declare(self, queue: str) -> None:
        """Declare the queue as Celery's ``send_task`` does (durable, with its direct exchange
        and binding, from the app's queue settings), once per connection. A queue that exists
        with other arguments (a worker's ``x-max-priority``, a quorum queue) refuses that
        declaration (406, closing the channel): then it is enough that it exists."""
        if queue in self._declared:
            return
        channel = self._open_channel()
        try:
            self._app.amqp.queues[queue](channel).declare()
        except self._channel_errors as error:
            if getattr(error, "code", None) != PRECONDITION_FAILED:
                raise
            self._channel = None
            self._open_channel().queue_declare(queue=queue, passive=True)
        self._declared.add(queue)

    def _wait_for_confirms(self) -> None:
        connection = self._connection
        assert connection is not None
        last_tag = self._next_tag - 1
        deadline = time.monotonic() + self._confirm_timeout_seconds
        while self._confirmed_through < last_tag and not self._refused:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{last_tag - self._confirmed_through} publishes not confirmed within "
                    f"{self._confirm_timeout_seconds:.0f}s"
                )
            connection.drain_events(timeout=remaining)
        if self._refused:
            raise _Unconfirmed(self._refused[0])

    # -- the Publisher protocol -------------------------------------------------------------

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[wire.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
        ahead: bool = False,
    ) -> int:
        """Publish all of ``messages`` and return only once the broker confirmed each one.

        ``ahead``: an AMQP queue has no front to publish to, so re-dispatches go to the
        rescue queue the workers consume beside it (``rescue_routing``, one passive
        declaration of each queue), or join its tail. A connection that fails at once may be a
        stale one (the broker restarted since the last sweep): the batch is sent once more
        on a fresh connection. Messages of the failed attempt that did reach the queue are
        duplicates with the same task id, which the workers' fence check drops.
        """
        if not messages:
            return 0
        if ahead:
            queue = self._attempt(
                functools.partial(
                    rescue_routing.queue_for_redispatch, queue=queue, consumers=self._consumers
                ),
                doing=f"counting the consumers of queue {queue!r}",
            )
        self._attempt(
            functools.partial(
                self._publish_confirmed,
                task_name=task_name,
                queue=queue,
                messages=messages,
                time_limits_seconds=time_limits_seconds,
            ),
            doing=f"publishing to queue {queue!r}",
        )
        return len(messages)

    def _consumers(self, queue: str) -> int | None:
        """How many consumers ``queue`` has; ``None`` when it does not exist."""
        channel = self._open_channel()
        try:
            _, _, consumers = channel.queue_declare(queue=queue, passive=True)
        except self._channel_errors as error:
            if getattr(error, "code", None) != NOT_FOUND:
                raise
            self._channel = None  # the server closed it
            return None
        return int(consumers)

    def _attempt(self, operation: Callable[[], _T], *, doing: str) -> _T:
        """``operation()`` under the lock; on a reused connection that fails, once more on a
        fresh one (a broker restart since the last call leaves a dead connection behind)."""
        with self._lock:
            reused = self._connection is not None
            try:
                return operation()
            except self._errors as error:
                self._drop_connection()
                # A nack, a return or a missing confirm is the broker's answer, not a stale
                # connection's: it would answer the same again.
                if not reused or isinstance(error, _Unconfirmed | TimeoutError):
                    raise urls.unavailable(error, url=self._url, doing=doing) from None
            try:
                return operation()
            except self._errors as error:
                self._drop_connection()
                raise urls.unavailable(error, url=self._url, doing=doing) from None

    def _publish_confirmed(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[wire.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
    ) -> None:
        self._declare(queue)
        channel = self._open_channel()
        frames = self._frames(
            task_name=task_name, queue=queue, time_limits_seconds=time_limits_seconds
        )
        write = self._connection.connection.transport.write
        for start in range(0, len(messages), CONFIRM_WINDOW):
            pending: list[bytes] = []
            for message in messages[start : start + CONFIRM_WINDOW]:
                wire = frames.frames(message)
                if wire is None:  # py-amqp serializes it (an odd id or a huge body)
                    if pending:
                        write(b"".join(pending))
                        pending.clear()
                    body, headers, properties = self._builder.amqp_parts(
                        task_name=task_name,
                        message=message,
                        time_limits_seconds=time_limits_seconds,
                    )
                    # mandatory: a message no queue takes comes back (basic.return) instead
                    # of being confirmed and dropped.
                    channel.basic_publish(
                        amqp_message(body, headers, properties),
                        exchange="",
                        routing_key=queue,
                        mandatory=True,
                    )
                else:
                    pending.append(wire)  # mandatory too (see AmqpFrames)
                self._next_tag += 1
            if pending:
                write(b"".join(pending))  # the window in one write
            self._wait_for_confirms()

    def _frames(
        self, *, task_name: str, queue: str, time_limits_seconds: tuple[float, float] | None
    ) -> AmqpFrames:
        key = (task_name, queue, time_limits_seconds)
        frames = self._frame_templates.get(key)
        if frames is None:
            frames = self._frame_templates[key] = AmqpFrames(
                template=self._builder.amqp_template(
                    task_name=task_name, time_limits_seconds=time_limits_seconds
                ),
                queue=queue,
                channel_id=self._channel.channel_id,
                frame_max=self._connection.connection.frame_max,
            )
        return frames

    def queue_depth(self, queue: str) -> int:
        return self._attempt(
            functools.partial(self._passive_depth, queue), doing=f"measuring queue {queue!r}"
        )

    def _passive_depth(self, queue: str) -> int:
        channel = self._open_channel()
        try:
            _, depth, _ = channel.queue_declare(queue=queue, passive=True)
        except self._channel_errors as error:
            if getattr(error, "code", None) != NOT_FOUND:
                raise
            self._channel = None  # the server closed it; a missing queue holds no messages
            return 0
        return int(depth)

    def instance_id(self) -> str | None:
        """``None``: RabbitMQ's server properties name the product, version and cluster, not
        the boot; and there is nothing to detect — a restart keeps durable queues and the
        persistent messages it confirmed (a confirm is sent once the message is on disk)."""
        return None

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        """``None``: AMQP cannot list a queue without consuming it, and it needs no audit —
        a consumer's unacknowledged messages go back to the queue when its connection or
        channel closes, so a worker that dies between taking and starting one loses nothing
        (the lease stays the backstop)."""
        return None

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        return None  # no audit, so nothing to count against (``messages_accounted_for``)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()
        self._app.close()
