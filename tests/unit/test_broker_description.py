"""A broker named in a message: enough to tell two apart, never a credential."""

from __future__ import annotations

import pytest

from celery_reconciler import broker


@pytest.mark.parametrize(
    ("url", "described"),
    [
        ("redis://:s3cret@127.0.0.1:6379/2", "redis 127.0.0.1:6379/2"),
        ("redis://localhost", "redis localhost/0"),
        ("rediss://user:pw@cache.example:6380/0", "rediss cache.example:6380/0"),
        ("amqp://guest:guest@rabbit:5672//", 'amqp rabbit:5672 vhost "/"'),
        ("amqp://u:p@rabbit:5672/tenant%2Fa", 'amqp rabbit:5672 vhost "tenant/a"'),
        ("pyamqp://rabbit", 'pyamqp rabbit vhost "/"'),
        ("redis://host:notaport/0", "the configured broker (its URL does not parse)"),
    ],
)
def test_a_broker_is_described_by_scheme_host_port_and_database_or_vhost(
    url: str, described: str
) -> None:
    text = broker.describe_broker_url(url)
    assert text == described
    for secret in ("s3cret", "pw", "guest:guest", "u:p"):
        assert secret not in text
