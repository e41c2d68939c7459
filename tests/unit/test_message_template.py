"""The message templates fill in exactly what Celery's message API builds per message: the
Redis envelope's JSON, the AMQP message's body, headers and properties, and the AMQP frames
spliced from them are the bytes py-amqp itself would write.

A worker-side proof that such messages run lives in tests/integration/test_broker_messages.py;
here the template is compared with the per-message build on awkward ids, so the fast path
can never drift from the one the integration test proves.
"""

from __future__ import annotations

import json
import uuid

import amqp.method_framing
import amqp.serialization
import amqp.spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_reconciler import broker

AWKWARD_IDS = [
    "1",
    "Plain-id_1.2:3@4+5",
    "100%",
    "",
    'quote"s and \\ backslashes',
    "'single' quotes",
    "ünïcödé ✓ 日本",
    "\x00\x01 control \n chars",
    "cr" + uuid.uuid4().hex + "entry",  # shaped like a sentinel
    "x" * broker.SHORT_ID_LENGTH,
    "x" * (broker.SHORT_ID_LENGTH + 1),  # past the template: built per message
]


def envelope_json(
    builder: broker.MessageBuilder, *, message: broker.TaskMessage, **kwargs: object
) -> str:
    """One message's envelope through the batch path the Redis publisher takes."""
    return builder.envelopes_json(messages=[message], **kwargs)[0]  # type: ignore[arg-type]


def comparable(envelope_text: str) -> dict[str, object]:
    envelope = json.loads(envelope_text)
    tag = envelope["properties"].pop("delivery_tag")
    assert str(uuid.UUID(tag)) == tag and uuid.UUID(tag).version == 4
    return dict(envelope)


def assert_same(entry_id: str, *, limits: tuple[float, float] | None = None) -> None:
    builder = broker.MessageBuilder(broker.message_app())
    message = broker.TaskMessage(entry_id=entry_id, task_id=str(uuid.uuid4()))
    kwargs = {"task_name": "insights.extract", "queue": "insights", "time_limits_seconds": limits}
    built = json.dumps(builder.build(message=message, **kwargs))  # type: ignore[arg-type]
    for _ in range(2):  # the second fill reuses the cached template
        filled = envelope_json(builder, message=message, **kwargs)
        assert comparable(filled) == comparable(built)


@pytest.mark.parametrize("entry_id", AWKWARD_IDS)
def test_a_filled_template_is_the_message_celery_builds(entry_id: str) -> None:
    assert_same(entry_id)
    assert_same(entry_id, limits=(800.0, 855.0))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=broker.SHORT_ID_LENGTH))
def test_any_short_id_fills_in_exactly(entry_id: str) -> None:
    assert_same(entry_id)


def test_a_batch_fills_each_message_as_celery_builds_it() -> None:
    builder = broker.MessageBuilder(broker.message_app())
    messages = [
        broker.TaskMessage(entry_id=entry_id, task_id=str(uuid.uuid4())) for entry_id in AWKWARD_IDS
    ]
    kwargs = {"task_name": "insights.extract", "queue": "insights", "time_limits_seconds": None}
    filled = builder.envelopes_json(messages=messages, **kwargs)  # type: ignore[arg-type]
    built = [json.dumps(builder.build(message=message, **kwargs)) for message in messages]  # type: ignore[arg-type]
    assert [comparable(envelope) for envelope in filled] == [comparable(one) for one in built]
    tags = {json.loads(envelope)["properties"]["delivery_tag"] for envelope in filled}
    assert len(tags) == len(messages)  # each message its own delivery tag


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=broker.SHORT_ID_LENGTH))
def test_any_task_id_fills_in_exactly(task_id: str) -> None:
    builder = broker.MessageBuilder(broker.message_app())
    message = broker.TaskMessage(entry_id="1", task_id=task_id)
    kwargs = {"task_name": "insights.extract", "queue": "insights", "time_limits_seconds": None}
    built = json.dumps(builder.build(message=message, **kwargs))  # type: ignore[arg-type]
    filled = envelope_json(builder, message=message, **kwargs)
    assert comparable(filled) == comparable(built)


def assert_same_amqp(entry_id: str, *, limits: tuple[float, float] | None = None) -> None:
    builder = broker.MessageBuilder(broker.message_app())
    message = broker.TaskMessage(entry_id=entry_id, task_id=str(uuid.uuid4()))
    kwargs = {"task_name": "insights.extract", "time_limits_seconds": limits}
    headers, properties, body = builder.parts(message=message, **kwargs)  # type: ignore[arg-type]
    built = (body, headers, {**properties, "delivery_mode": broker.DELIVERY_MODE_PERSISTENT})
    for _ in range(2):  # the second fill reuses the cached template
        assert builder.amqp_parts(message=message, **kwargs) == built  # type: ignore[arg-type]


@pytest.mark.parametrize("entry_id", AWKWARD_IDS)
def test_a_filled_amqp_template_is_the_message_celery_builds(entry_id: str) -> None:
    assert_same_amqp(entry_id)
    assert_same_amqp(entry_id, limits=(800.0, 855.0))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=broker.SHORT_ID_LENGTH))
def test_any_short_id_fills_the_amqp_template_in_exactly(entry_id: str) -> None:
    assert_same_amqp(entry_id)


class FrameCapture:
    """What py-amqp's ``frame_writer`` needs of a connection and its transport; it keeps
    the bytes py-amqp would send, as the reference for our spliced frames."""

    frame_max = 131072
    bytes_sent = 0

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += bytes(data)


def assert_same_frames(entry_id: str, *, limits: tuple[float, float] | None = None) -> None:
    builder = broker.MessageBuilder(broker.message_app())
    template = builder.amqp_template(task_name="insights.extract", time_limits_seconds=limits)
    frames = broker.AmqpFrames(
        template=template, queue="insights", channel_id=7, frame_max=FrameCapture.frame_max
    )
    message = broker.TaskMessage(entry_id=entry_id, task_id=str(uuid.uuid4()))
    parts = builder.amqp_parts(
        task_name="insights.extract", message=message, time_limits_seconds=limits
    )
    capture = FrameCapture()
    write_frame = amqp.method_framing.frame_writer(capture, capture)
    publish_args = amqp.serialization.dumps("Bssbb", (0, "", "insights", True, False))
    write_frame(1, 7, amqp.spec.Basic.Publish, publish_args, broker.amqp_message(*parts))
    spliced = frames.frames(message)
    if len(entry_id) > broker.SHORT_ID_LENGTH:
        assert spliced is None  # published through py-amqp instead
    else:
        assert spliced == bytes(capture.written)


@pytest.mark.parametrize("entry_id", AWKWARD_IDS)
def test_spliced_amqp_frames_are_the_bytes_py_amqp_writes(entry_id: str) -> None:
    assert_same_frames(entry_id)
    assert_same_frames(entry_id, limits=(800.0, 855.0))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=broker.SHORT_ID_LENGTH))
def test_any_short_id_splices_into_the_bytes_py_amqp_writes(entry_id: str) -> None:
    assert_same_frames(entry_id)
