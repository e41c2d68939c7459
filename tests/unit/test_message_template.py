"""The message templates fill in exactly what Celery's message API builds per message: the
Redis envelope's JSON, and the AMQP message's body, headers and properties.

A worker-side proof that such messages run lives in tests/integration/test_broker_messages.py;
here the template is compared with the per-message build on awkward ids, so the fast path
can never drift from the one the integration test proves.
"""

from __future__ import annotations

import json
import uuid

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


def comparable(envelope_json: str) -> dict[str, object]:
    envelope = json.loads(envelope_json)
    tag = envelope["properties"].pop("delivery_tag")
    assert str(uuid.UUID(tag)) == tag and uuid.UUID(tag).version == 4
    return dict(envelope)


def assert_same(entry_id: str, *, limits: tuple[float, float] | None = None) -> None:
    builder = broker.MessageBuilder(broker.message_app())
    message = broker.TaskMessage(entry_id=entry_id, task_id=str(uuid.uuid4()))
    kwargs = {"task_name": "insights.extract", "queue": "insights", "time_limits_seconds": limits}
    built = json.dumps(builder.build(message=message, **kwargs))  # type: ignore[arg-type]
    for _ in range(2):  # the second fill reuses the cached template
        filled = builder.envelope_json(message=message, **kwargs)  # type: ignore[arg-type]
        assert comparable(filled) == comparable(built)


@pytest.mark.parametrize("entry_id", AWKWARD_IDS)
def test_a_filled_template_is_the_message_celery_builds(entry_id: str) -> None:
    assert_same(entry_id)
    assert_same(entry_id, limits=(800.0, 855.0))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=broker.SHORT_ID_LENGTH))
def test_any_short_id_fills_in_exactly(entry_id: str) -> None:
    assert_same(entry_id)


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
