"""Where re-dispatches go on RabbitMQ (``rescue_routing``), and which queues a worker adds to
its own for them (``celery_reconciler_worker.rescue_queue``)."""

from __future__ import annotations

import types

import celery
import pytest

from celery_reconciler import rescue_routing
from celery_reconciler_worker import rescue_queue


@pytest.mark.parametrize(
    ("rescue_consumers", "queue_consumers", "expected"),
    [
        (None, 3, "insights"),  # no worker ever declared the rescue queue
        (None, 0, "insights"),
        (2, 3, "insights.rescue"),  # workers read it
        (1, 0, "insights.rescue"),
        (0, 0, "insights.rescue"),  # nobody reads either: whoever comes next reads both
        (0, None, "insights.rescue"),
        (0, 3, "insights"),  # workers read the queue only (an older release): the tail
    ],
)
def test_a_redispatch_goes_to_the_rescue_queue_only_where_a_worker_will_read_it(
    rescue_consumers: int | None, queue_consumers: int | None, expected: str
) -> None:
    consumers = {"insights.rescue": rescue_consumers, "insights": queue_consumers}
    assert (
        rescue_routing.queue_for_redispatch(queue="insights", consumers=consumers.__getitem__)
        == expected
    )


def selected_after_setup(broker_url: str, *, selected: list[str]) -> set[str]:
    app = celery.Celery("unit", broker=broker_url, set_as_current=False)
    app.amqp.queues.select(selected)
    rescue_queue._consume_rescue_queues(instance=types.SimpleNamespace(app=app))
    return set(app.amqp.queues.consume_from)


def test_an_amqp_worker_consumes_each_selected_queues_rescue_queue_too() -> None:
    selected = selected_after_setup("amqp://guest@127.0.0.1:1//", selected=["insights", "reports"])
    assert selected == {"insights", "insights.rescue", "reports", "reports.rescue"}


def test_a_rescue_queue_is_not_doubled_nor_added_where_amqp_could_not_name_it() -> None:
    longest = "q" * (rescue_queue.AMQP_NAME_MAX_BYTES - len(rescue_queue.RESCUE_QUEUE_SUFFIX))
    too_long = longest + "q"
    selected = selected_after_setup(
        "amqp://guest@127.0.0.1:1//", selected=["insights", "insights.rescue", longest, too_long]
    )
    assert selected == {"insights", "insights.rescue", longest, f"{longest}.rescue", too_long}


def test_a_redis_worker_consumes_only_its_queues() -> None:
    # On Redis the operator pushes rescued messages to the front of the queue itself.
    assert selected_after_setup("redis://127.0.0.1:1/0", selected=["insights"]) == {"insights"}
