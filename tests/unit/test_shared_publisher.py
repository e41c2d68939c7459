"""A shared publisher reuses the broker's answers to the questions every sweep asks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_reconciler import broker, publishers


class Broker:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.identity = "run-1"
        self.fail = False

    def instance_id(self) -> str | None:
        self.asked.append("identity")
        if self.fail:
            raise broker.BrokerUnavailable("the broker is away")
        return self.identity

    def queue_depth(self, queue: str) -> int:
        self.asked.append(queue)
        return len(queue)


@pytest.fixture
def shared() -> Iterator[tuple[publishers.SharedPublisher, Broker, list[float]]]:
    now = [100.0]
    publisher = publishers.SharedPublisher("redis://127.0.0.1:1/0", clock=lambda: now[0])
    fake = Broker()
    publisher._publisher = fake  # type: ignore[assignment]
    yield publisher, fake, now


def test_answers_within_the_reuse_window_are_shared(
    shared: tuple[publishers.SharedPublisher, Broker, list[float]],
) -> None:
    publisher, fake, now = shared
    assert publisher.instance_id() == "run-1"
    assert publisher.queue_depth("a") == 1 and publisher.queue_depth("bb") == 2
    now[0] += publishers.ANSWER_REUSE_SECONDS / 2
    fake.identity = "run-2"
    assert publisher.instance_id() == "run-1"
    assert publisher.queue_depth("a") == 1
    assert fake.asked == ["identity", "a", "bb"]
    now[0] += publishers.ANSWER_REUSE_SECONDS
    assert publisher.instance_id() == "run-2"  # a restart shows within the window
    assert fake.asked == ["identity", "a", "bb", "identity"]


def test_a_failure_is_not_kept(
    shared: tuple[publishers.SharedPublisher, Broker, list[float]],
) -> None:
    publisher, fake, _ = shared
    fake.fail = True
    with pytest.raises(broker.BrokerUnavailable):
        publisher.instance_id()
    fake.fail = False
    assert publisher.instance_id() == "run-1"


def test_policies_share_a_publisher_only_when_they_name_the_same_redis_keys() -> None:
    # redis-py connects on the first command: attaching opens no socket.
    url = "redis://127.0.0.1:1/0"
    renamed = {"unacked_key": "app_one_unacked", "priority_steps": [0, 5, 9]}
    first, second = publishers.attach(url), publishers.attach(url, transport_options={})
    third = publishers.attach(url, transport_options=dict(reversed(renamed.items())))
    fourth = publishers.attach(url, transport_options=renamed)
    try:
        assert first is second
        assert third is fourth
        assert third is not first
        inner = third._publisher
        assert isinstance(inner, broker.RedisPublisher)
        assert inner._unacked_key == "app_one_unacked"
    finally:
        for shared in (first, second, third, fourth):
            publishers.detach(shared)
