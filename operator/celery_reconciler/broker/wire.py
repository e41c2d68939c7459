"""Celery's wire format, built once per task and filled in per message.

The operator never imports the user's task code: it sends ``spec.task.name`` with the entry
id as the only positional argument and ``task id = fence token``, so the worker's fence check
(``ledger.start_attempt``) can tell the current dispatch from stale ones.

Each message is built with Celery's own message API (``app.amqp.create_task_message``:
protocol 2 headers, ``argsrepr``, ``timelimit``, ``root_id`` ...) and serialized as JSON,
byte for byte what kombu's ``json`` serializer writes for these plain values. For Redis it
is wrapped in the envelope kombu's virtual channel produces (``prepare_message`` plus
``basic_publish``'s augmentation: base64 body, ``delivery_info``, ``delivery_tag``), with the
anonymous-exchange routing Celery itself uses for direct queues (``exchange=''``,
``routing_key=<queue>``); for AMQP it is the body, headers and properties ``send_task``
would publish. Since the messages of a batch differ only by their ids, Celery's API runs
once per task and queue, for a sample, and the result is a template filled per message
(``_EnvelopeTemplate``, ``AmqpTemplate``); unit tests compare every fill with the
per-message build on awkward ids.

Copying a library's wire format is a debt: it is kept here, in one module, next to those
tests, and the lock pins kombu and py-amqp (docs/development.md).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

import celery
import celery.utils.nodenames

DELIVERY_MODE_PERSISTENT = 2
SHORT_ID_LENGTH = 200


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """One dispatch: run ``task_name(entry_id)`` with ``task id = task_id`` on ``queue``."""

    entry_id: str
    task_id: str


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
        self._amqp_templates: dict[tuple[str, str, tuple[float, float] | None], AmqpTemplate] = {}

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
        filled into a template built once per task like ``envelopes_json``."""
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
    ) -> AmqpTemplate:
        key = (task_name, "", time_limits_seconds)
        template = self._amqp_templates.get(key)
        if template is None:
            template = self._amqp_templates[key] = AmqpTemplate.of(
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


class AmqpTemplate:
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
    def of(cls, parts: Any) -> AmqpTemplate:
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
