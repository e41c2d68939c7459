from __future__ import annotations

import io
import json
import logging

import pytest

from celery_reconciler import logs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "could not connect to postgresql://app:hunter2@db:5432/journal",
            "could not connect to postgresql://app:***@db:5432/journal",
        ),
        ("host=db password=hunter2 dbname=x", "host=db password=*** dbname=x"),
        ("password='a b c' user=x", "password=*** user=x"),
        ("redis://127.0.0.1:6379/0 has no secret", "redis://127.0.0.1:6379/0 has no secret"),
    ],
)
def test_redact_masks_passwords_and_keeps_the_rest(text: str, expected: str) -> None:
    assert logs.redact(text) == expected


def test_the_filter_scrubs_messages_args_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactSecrets())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test-redaction")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        raise ConnectionError("redis://:topsecret@10.0.0.1:6379 refused")
    except ConnectionError:
        logger.exception("broker %s failed", "amqp://guest:topsecret@rabbit//")
    line = stream.getvalue()
    assert "topsecret" not in line
    entry = json.loads(line)
    assert entry["message"] == "broker amqp://guest:***@rabbit// failed"
    assert "redis://:***@10.0.0.1:6379 refused" in entry["exception"]


def test_json_lines_carry_structured_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "swept", None, None)
    record.fields = {"policy": "ns/p", "dispatched": 3}
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["policy"] == "ns/p"
    assert entry["dispatched"] == 3
    assert entry["level"] == "info"


def log_through_configured_handler(logger_name: str, level: int, message: str) -> str:
    """One record through the handler ``logs.configure`` installs; the root logger's own
    handlers (pytest's) are put back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        logs.configure(json_logs=True)
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        logging.getLogger(logger_name).log(level, message)
    finally:
        root.handlers[:], root.level = saved_handlers, saved_level
    return stream.getvalue()


@pytest.mark.parametrize(
    ("logger_name", "message", "level"),
    [
        (
            "kopf._cogs.clients.api",
            "Request attempt #1/9 failed; will retry: GET https://127.0.0.1:6443/apis -> "
            "APITooManyRequestsError('storage is (re)initializing')",
            "warning",
        ),
        ("kopf._cogs.clients.api", "Request attempt #9/9 failed; escalating: GET x", "error"),
        ("celery_reconciler.loop", "a sweep failed; will retry", "error"),
    ],
)
def test_a_request_kopf_retries_by_itself_is_a_warning_and_the_last_attempt_an_error(
    logger_name: str, message: str, level: str
) -> None:
    line = log_through_configured_handler(logger_name, logging.ERROR, message)
    assert json.loads(line)["level"] == level
