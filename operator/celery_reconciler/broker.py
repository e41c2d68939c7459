"""Publishing Celery tasks by name, a batch at a time; queue depth for backpressure.

The operator never imports the user's task code: it sends ``spec.task.name`` with the entry
id as the only positional argument and ``task id = fence token``, so the worker's fence check
(``ledger.start_attempt``) can tell the current dispatch from stale ones.

Why not ``app.send_task`` in a loop: it costs one broker round trip per message, even on a
reused producer (``make bench`` prints its rate beside ours), which makes dispatching a
large backlog slow. On Redis we instead

1. build each message with Celery's own message API (``app.amqp.create_task_message``:
   protocol 2 headers, ``argsrepr``, ``timelimit``, ``root_id`` ...) and serialize it as
   JSON, byte for byte what kombu's ``json`` serializer writes for these plain values,
2. wrap it in the envelope kombu's virtual channel produces (``prepare_message`` plus
   ``basic_publish``'s augmentation: base64 body, ``delivery_info``, ``delivery_tag``), with
   the anonymous-exchange routing Celery itself uses for direct queues
   (``exchange=''``, ``routing_key=<queue>``),
3. ``LPUSH`` the whole batch onto the queue's list in one pipelined round trip — the list
   and the command kombu's Redis transport uses in ``Channel._put`` for priority 0.

A stock ``celery worker`` cannot tell these messages from ``send_task`` ones (an
integration test proves it on headers, retries and task id, on both brokers).

On AMQP (RabbitMQ: ``amqp://``, ``amqps://``, ``pyamqp://``) ``AmqpPublisher`` sends the same
protocol-2 messages (headers, properties and JSON body from the same template, as
``send_task`` would publish them) on one py-amqp channel in **publisher-confirm** mode, and
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
Other brokers (SQS ...) fall back to ``send_task`` on one reused producer: correct, just
not batched.

The operator sends no per-message time limit: a body may run as long as its worker keeps
heartbeating (``celery_reconciler_worker``), and a worker that cannot heartbeat stops its own
bodies. Re-dispatches (rescues, due retries) are published *ahead* of the backlog on Redis
(``RPUSH`` to the end kombu pops), so rescued work runs next instead of last; on AMQP
they go to the rescue queue (``rescue_routing``).

Broker errors surface as ``BrokerUnavailable`` whose message never contains the URL's
password (``redact_url``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import os
import re
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import amqp.basic_message
import amqp.serialization
import amqp.spec
import celery
import celery.utils.nodenames
import kombu.exceptions
import kombu.transport
import redis
import redis.exceptions

from celery_reconciler import rescue_routing

# kombu's Redis transport: priority steps and the separator of priority sub-queues, unless the
# app's broker_transport_options change them (RedisPublisher's transport_options).
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_PRIORITY_SEPARATOR = "\x06\x16"
# Values per LPUSH command inside the one pipeline: bounds a single command's size.
LPUSH_CHUNK = 1000
DELIVERY_MODE_PERSISTENT = 2
FRAME_END = b"\xce"
SHORT_ID_LENGTH = 200


class BrokerUnavailable(RuntimeError):
    """The broker refused or failed a publish or a depth query; the message has no secrets."""


class BrokerUrlInvalid(BrokerUnavailable):
    """The broker URL does not parse. It came from a Secret, so the message quotes none of
    it (URL parsers quote the offending part, e.g. a port that is really a password)."""


def check_broker_url(url: str, *, where: str) -> None:
    """Raise ``BrokerUrlInvalid`` naming ``where`` the URL came from — never what it says."""
    problem = None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
        if "://" not in url or not parts.scheme:
            problem = "it has no scheme"
        elif parts.scheme.partition("+")[0] not in kombu.transport.TRANSPORT_ALIASES:
            # e.g. a DSN in the broker's Secret: no broker at all, and kombu would only fail
            # later, inside a publish, with an error that quotes the URL.
            problem = "its scheme names no broker kombu knows"
    except ValueError:
        problem = "it does not parse"
    if problem is not None:
        raise BrokerUrlInvalid(
            f"{where} is not a broker URL ({problem}; expected e.g. redis://host:6379/0; its "
            "content is not shown because it came from a Secret)"
        )


def describe_broker_url(url: str) -> str:
    """``redis 127.0.0.1:6379/0``, ``amqp rabbit:5672 vhost "/"``: enough for a person to
    tell two brokers apart, never a user name or password."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port
    except ValueError:
        return "the configured broker (its URL does not parse)"
    scheme = parts.scheme.partition("+")[0] or "broker"
    where = f"{host}:{port}" if port else host
    path = urllib.parse.unquote(parts.path[1:]) if parts.path.startswith("/") else parts.path
    if scheme in ("redis", "rediss"):
        return f"{scheme} {where}/{path or '0'}"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return f'{scheme} {where} vhost "{path or "/"}"'
    return f"{scheme} {where}"


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """One dispatch: run ``task_name(entry_id)`` with ``task id = task_id`` on ``queue``."""

    entry_id: str
    task_id: str


class Publisher(Protocol):
    """What ``reconcile`` needs from a broker (tests may pass their own)."""

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[TaskMessage],
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


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (``redis://:***@host:6379/0``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None and "@" not in parts.netloc:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = urllib.parse.quote(parts.username or "", safe="")
        userinfo = f"{user}:***" if parts.password is not None else user
        return urllib.parse.urlunsplit(
            (parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, "")
        )
    except ValueError:
        return "the configured broker URL (it does not parse)"


def url_secrets(url: str) -> tuple[str, ...]:
    found = [url]
    with contextlib.suppress(ValueError):
        password = urllib.parse.urlsplit(url).password
        if password:
            found.extend({password, urllib.parse.unquote(password)})
    return tuple(found)


def _scrub(text: str, url: str) -> str:
    for secret in url_secrets(url):
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def unavailable(error: BaseException, *, url: str, doing: str) -> BrokerUnavailable:
    reason = _scrub(str(error).strip() or type(error).__name__, url)
    return BrokerUnavailable(
        f"broker unavailable while {doing} ({redact_url(url)}): {reason} — check that the "
        "broker is up and that its URL (spec.task.brokerSecretRef, --broker or "
        "CELERY_BROKER_URL) is right"
    )


def message_app(url: str | None = None) -> celery.Celery:
    """A Celery app used only to build and route messages; it registers no tasks."""
    app = celery.Celery("celery-reconciler", broker=url, set_as_current=False)
    # MessageBuilder writes JSON bodies; the kombu fallback must agree.
    app.conf.task_serializer = "json"
    app.conf.accept_content = ["json"]
    return app


class MessageBuilder:
    """Builds the envelopes kombu's Redis transport stores for ``send_task(name, [id])``.

    Holds what is the same for every message of a process (serializer, origin, reply-to)
    so the per-message work is Celery's ``create_task_message`` plus serialization.
    """

    def __init__(self, app: celery.Celery) -> None:
        self._app = app
        self._reply_to = str(app.thread_oid)
        self._origin = celery.utils.nodenames.anon_nodename()
        self._templates: dict[tuple[str, str, tuple[float, float] | None], _EnvelopeTemplate] = {}
        self._amqp_templates: dict[tuple[str, str, tuple[float, float] | None], _AmqpTemplate] = {}

    def envelope_json(
        self,
        *,
        task_name: str,
        queue: str,
        message: TaskMessage,
        time_limits_seconds: tuple[float, float] | None,
    ) -> str:
        """``json.dumps(build(...))`` of one message; see ``envelopes_json``."""
        return self.envelopes_json(
            task_name=task_name,
            queue=queue,
            messages=[message],
            time_limits_seconds=time_limits_seconds,
        )[0]

    def envelopes_json(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
    ) -> list[str]:
        """``json.dumps(build(...))`` of each message, filled into a template built once per
        task and queue: every message of a batch differs only by its entry id, task id and
        delivery tag, so Celery's message API runs once per template instead of once per
        message, and the template is looked up once per batch."""
        key = (task_name, queue, time_limits_seconds)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = _EnvelopeTemplate.of(
                lambda sample: self.build(
                    task_name=task_name,
                    queue=queue,
                    message=sample,
                    time_limits_seconds=time_limits_seconds,
                )
            )
        envelopes = template.fill_all(messages)
        for index, message in enumerate(messages):
            if len(message.entry_id) > SHORT_ID_LENGTH:  # Celery abbreviates long argsrepr
                envelopes[index] = json.dumps(
                    self.build(
                        task_name=task_name,
                        queue=queue,
                        message=message,
                        time_limits_seconds=time_limits_seconds,
                    )
                )
        return envelopes

    def build(
        self,
        *,
        task_name: str,
        queue: str,
        message: TaskMessage,
        time_limits_seconds: tuple[float, float] | None,
    ) -> dict[str, Any]:
        headers, properties, payload = self.parts(
            task_name=task_name, message=message, time_limits_seconds=time_limits_seconds
        )
        return {
            "body": base64.b64encode(payload).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": DELIVERY_MODE_PERSISTENT,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }

    def amqp_parts(
        self,
        *,
        task_name: str,
        message: TaskMessage,
        time_limits_seconds: tuple[float, float] | None,
    ) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """``(body, headers, properties)`` of an AMQP message as ``send_task`` publishes it
        (kombu's ``Producer.publish`` adds ``delivery_mode``; the body is the JSON itself),
        filled into a template built once per task like ``envelope_json``."""
        if len(message.entry_id) > SHORT_ID_LENGTH:
            headers, properties, payload = self.parts(
                task_name=task_name, message=message, time_limits_seconds=time_limits_seconds
            )
            return payload, headers, {**properties, "delivery_mode": DELIVERY_MODE_PERSISTENT}
        return self.amqp_template(
            task_name=task_name, time_limits_seconds=time_limits_seconds
        ).fill(message)

    def amqp_template(
        self, *, task_name: str, time_limits_seconds: tuple[float, float] | None
    ) -> _AmqpTemplate:
        key = (task_name, "", time_limits_seconds)
        template = self._amqp_templates.get(key)
        if template is None:
            template = self._amqp_templates[key] = _AmqpTemplate.of(
                lambda sample: self.parts(
                    task_name=task_name, message=sample, time_limits_seconds=time_limits_seconds
                )
            )
        return template

    def parts(
        self,
        *,
        task_name: str,
        message: TaskMessage,
        time_limits_seconds: tuple[float, float] | None,
    ) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        """Celery's own ``create_task_message``: ``(headers, properties, JSON body)``."""
        soft, hard = time_limits_seconds or (None, None)
        args = [message.entry_id]  # a list, as send_task(args=[...]) passes it
        headers, properties, body, _ = self._app.amqp.create_task_message(
            message.task_id,
            task_name,
            args,
            {},
            time_limit=hard,
            soft_time_limit=soft,
            reply_to=self._reply_to,
            ignore_result=None,
            origin=self._origin,
            # Celery's saferepr of a one-string list is its repr unless it is huge; passing
            # it saves a third of the build time. Long ids are left to saferepr.
            argsrepr=repr(args) if len(message.entry_id) <= SHORT_ID_LENGTH else None,
            kwargsrepr="{}",
            create_sent_event=False,
        )
        # kombu's JSON serializer yields exactly ``json.dumps`` for these plain values (ids,
        # names, None); calling the stdlib directly halves the cost of a message.
        return headers, dict(properties), json.dumps(body).encode("utf-8")


# Ids whose JSON is the id in quotes and whose repr is the id in single quotes: most ids.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:@+-]*")


class _EnvelopeTemplate:
    """An envelope's JSON as a ``%``-format string with named slots for what differs per
    message: the entry id (in the body and ``argsrepr``), the task id and the delivery tag.

    Built from a real envelope of a sample message whose entry id and task id are sentinels
    no real value contains; filling it yields exactly the JSON ``build`` would (a unit test
    compares them on awkward ids), at a fraction of the cost.
    """

    def __init__(self, envelope_format: str, body_format: str) -> None:
        self._envelope_format = envelope_format
        self._body_format = body_format

    @classmethod
    def of(cls, build: Any) -> _EnvelopeTemplate:
        marker = uuid.uuid4().hex
        sentinels = {kind: f"cr{marker}{kind}" for kind in ("entry", "task", "args", "body", "tag")}
        envelope = build(TaskMessage(entry_id=sentinels["entry"], task_id=sentinels["task"]))
        body_text = json.dumps(json.loads(base64.b64decode(envelope["body"])))
        if body_text.count(json.dumps(sentinels["entry"])) != 1:
            raise AssertionError("the message body does not hold the entry id exactly once")
        envelope["body"] = sentinels["body"]
        envelope["headers"]["argsrepr"] = sentinels["args"]
        envelope["properties"]["delivery_tag"] = sentinels["tag"]
        envelope_text = json.dumps(envelope)

        def format_of(text: str) -> str:
            text = text.replace("%", "%%")
            for kind, sentinel in sentinels.items():
                text = text.replace(json.dumps(sentinel), f"%({kind})s")
            if marker in text:
                raise AssertionError("a sentinel is left inside a longer string")
            return text

        return cls(format_of(envelope_text), format_of(body_text))

    def fill_all(self, messages: Sequence[TaskMessage]) -> list[str]:
        """The envelope of each message. Per message this is string formatting only: the
        delivery tags' randomness is drawn once for the batch, and ids that need no JSON
        escaping (entry ids mostly, task ids always: they are fence tokens) are quoted
        directly instead of through ``json.dumps``."""
        randomness = os.urandom(16 * len(messages)).hex()
        envelopes = []
        for index, message in enumerate(messages):
            entry_id, task_id = message.entry_id, message.task_id
            if _PLAIN_ID.fullmatch(entry_id):
                entry, args = f'"{entry_id}"', f"\"['{entry_id}']\""
            else:
                entry, args = json.dumps(entry_id), json.dumps(repr([entry_id]))
            body = self._body_format % {"entry": entry}
            # A version-4 UUID, as kombu's delivery tags are: version nibble 4, variant 10xx.
            random_hex = randomness[32 * index : 32 * index + 32]
            variant = _UUID_VARIANT_DIGITS[int(random_hex[16], 16) & 3]
            envelopes.append(
                self._envelope_format
                % {
                    "entry": entry,
                    "task": f'"{task_id}"' if _PLAIN_ID.fullmatch(task_id) else json.dumps(task_id),
                    "args": args,
                    "body": '"' + base64.b64encode(body.encode("utf-8")).decode("ascii") + '"',
                    "tag": f'"{random_hex[:8]}-{random_hex[8:12]}-4{random_hex[13:16]}-'
                    f'{variant}{random_hex[17:20]}-{random_hex[20:32]}"',
                }
            )
        return envelopes


_UUID_VARIANT_DIGITS = "89ab"


class _AmqpTemplate:
    """An AMQP message's parts with slots for what differs per message: the body as a
    ``%``-format string (the entry id), and the header and property keys that hold the task
    id or the ``argsrepr``. Built from a sample with sentinel ids, like ``_EnvelopeTemplate``;
    a unit test compares a fill with Celery's per-message build."""

    def __init__(
        self,
        *,
        headers: dict[str, Any],
        properties: dict[str, Any],
        body_format: str,
        task_id_headers: tuple[str, ...],
        task_id_properties: tuple[str, ...],
    ) -> None:
        self._headers = headers
        self._properties = properties
        self._body_format = body_format
        self._task_id_headers = task_id_headers
        self._task_id_properties = task_id_properties

    @classmethod
    def of(cls, parts: Any) -> _AmqpTemplate:
        marker = uuid.uuid4().hex
        entry, task = f"cr{marker}entry", f"cr{marker}task"
        headers, properties, body = parts(TaskMessage(entry_id=entry, task_id=task))
        body_text = body.decode("utf-8")
        if body_text.count(json.dumps(entry)) != 1 or task in body_text:
            raise AssertionError("the message body does not hold the entry id exactly once")
        task_id_headers = tuple(key for key, value in headers.items() if value == task)
        task_id_properties = tuple(key for key, value in properties.items() if value == task)
        leftovers = [
            {key: value for key, value in headers.items() if key not in task_id_headers},
            {key: value for key, value in properties.items() if key not in task_id_properties},
        ]
        leftovers[0].pop("argsrepr", None)
        if marker in json.dumps(leftovers, default=str):
            raise AssertionError("a sentinel is left where the template has no slot for it")
        body_format = body_text.replace("%", "%%").replace(json.dumps(entry), "%s")
        return cls(
            headers=headers,
            properties={**properties, "delivery_mode": DELIVERY_MODE_PERSISTENT},
            body_format=body_format,
            task_id_headers=task_id_headers,
            task_id_properties=task_id_properties,
        )

    def body(self, message: TaskMessage) -> bytes:
        return (self._body_format % json.dumps(message.entry_id)).encode("utf-8")

    def fill(self, message: TaskMessage) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        entry_id = message.entry_id
        headers = dict(self._headers)
        properties = dict(self._properties)
        for key in self._task_id_headers:
            headers[key] = message.task_id
        for key in self._task_id_properties:
            properties[key] = message.task_id
        headers["argsrepr"] = repr([entry_id])
        return self.body(message), headers, properties


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
        template: _AmqpTemplate,
        queue: str,
        channel_id: int,
        frame_max: int,
    ) -> None:
        self._template = template
        self._channel_id = channel_id
        self._frame_max = frame_max
        sample_task = str(uuid.uuid4())
        sample_args = f"cr{uuid.uuid4().hex}args"
        body, headers, properties = template.fill(TaskMessage(entry_id="0", task_id=sample_task))
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

    def properties(self, message: TaskMessage) -> bytes | None:
        """The serialized properties of ``message``; ``None`` where the splice does not
        apply (a task id that is not a UUID's 36 ASCII characters)."""
        task = message.task_id.encode("utf-8")
        if len(task) != len(self._task) or len(message.entry_id) > SHORT_ID_LENGTH:
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

    def frames(self, message: TaskMessage) -> bytes | None:
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
        self._builder = MessageBuilder(message_app(url))
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
            raise BrokerUrlInvalid(
                _URL_WHERE + " is not a Redis URL (its content is not shown)"
            ) from None

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[TaskMessage],
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
            raise unavailable(
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
            raise unavailable(error, url=self._url, doing=f"measuring queue {queue!r}") from None
        return sum(int(size) for size in sizes)

    def instance_id(self) -> str | None:
        try:
            server = self._client.info("server")
        except redis.exceptions.RedisError as error:
            raise unavailable(error, url=self._url, doing="asking the broker who it is") from None
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
            raise unavailable(error, url=self._url, doing=f"reading queue {queue!r}") from None
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
            raise unavailable(error, url=self._url, doing=f"measuring queue {queue!r}") from None
        return int(waiting) + int(taken)

    def close(self) -> None:
        self._client.close()


class KombuPublisher:
    """Any other broker: Celery's ``send_task`` on one reused producer."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._app = message_app(url)

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[TaskMessage],
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
            raise unavailable(
                error, url=self._url, doing=f"publishing to queue {queue!r}"
            ) from None
        return len(messages)

    def queue_depth(self, queue: str) -> int:
        try:
            with self._app.connection_for_write() as connection:
                _, depth, _ = connection.default_channel.queue_declare(queue=queue, passive=True)
                return int(depth)
        except (kombu.exceptions.KombuError, OSError, ConnectionError) as error:
            raise unavailable(error, url=self._url, doing=f"measuring queue {queue!r}") from None

    def instance_id(self) -> str | None:
        return None  # kombu exposes no server identity for the other transports

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        return None  # kombu cannot list a queue's messages without taking them

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        return None  # nothing to count against: there is no audit (above)

    def close(self) -> None:
        self._app.close()


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
        self._app = message_app(url)
        self._builder = MessageBuilder(self._app)
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
        messages: Sequence[TaskMessage],
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
                    raise unavailable(error, url=self._url, doing=doing) from None
            try:
                return operation()
            except self._errors as error:
                self._drop_connection()
                raise unavailable(error, url=self._url, doing=doing) from None

    def _publish_confirmed(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[TaskMessage],
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


_URL_WHERE = "the broker URL (spec.task.brokerSecretRef, --broker or CELERY_BROKER_URL)"


def connect(url: str, *, transport_options: Mapping[str, Any] | None = None) -> Publisher:
    """The fastest correct publisher for ``url``: pipelined on Redis, batched with publisher
    confirms on AMQP, kombu's ``send_task`` otherwise."""
    check_broker_url(url, where=_URL_WHERE)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return RedisPublisher(url, transport_options=transport_options)
    if scheme in AMQP_SCHEMES:
        return AmqpPublisher(url)
    return KombuPublisher(url)
