"""One broker publisher per broker URL, shared by every policy that names it.

A publisher is not just a socket: it carries a Celery app that builds the messages, its
templates and its connection pool. One per policy made the operator's memory grow with its
policies (and opened a broker connection each) although most policies of an installation
name one broker. Here the policies whose Secret resolves to the same URL, and that name the
same Redis keys (``spec.task.brokerTransportOptions``), share one.

Every sweep of every policy asks the broker who it is (a restart without persistence lost
the queues) and how deep the policy's queue is (a metric). With hundreds of policies those
answers are shared for ``ANSWER_REUSE_SECONDS``: a restart is noticed that much later at
most, and a queue's depth is that much older, instead of one more request per sweep.

Redis publishers are safe to share between threads (redis-py's client hands each call a
connection of its pool); AMQP and kombu publishers hold one channel with its confirms, so
calls to them are taken one at a time under a lock — as a single policy's sweeps already
were.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from celery_reconciler import broker, shared_by_key

ANSWER_REUSE_SECONDS = 1.0
_T = TypeVar("_T")


class SharedPublisher:
    """A ``broker.Publisher`` for several policies; ``close`` is ``detach``'s business."""

    def __init__(
        self,
        url: str,
        *,
        transport_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.key = _key(url, transport_options)
        self._clock = clock
        self._answers: dict[tuple[str, ...], tuple[float, object]] = {}
        self._publisher = broker.connect(url, transport_options=transport_options)
        self._turns: contextlib.AbstractContextManager[object] = (
            contextlib.nullcontext()
            if isinstance(self._publisher, broker.RedisPublisher)
            else threading.Lock()
        )

    def __repr__(self) -> str:
        return "SharedPublisher()"  # the URL may hold a password

    def publish(
        self,
        *,
        task_name: str,
        queue: str,
        messages: Sequence[broker.TaskMessage],
        time_limits_seconds: tuple[float, float] | None,
        ahead: bool = False,
    ) -> int:
        with self._turns:
            return self._publisher.publish(
                task_name=task_name,
                queue=queue,
                messages=messages,
                time_limits_seconds=time_limits_seconds,
                ahead=ahead,
            )

    def queue_depth(self, queue: str) -> int:
        return self._recent(("depth", queue), lambda: self._publisher.queue_depth(queue))

    def instance_id(self) -> str | None:
        return self._recent(("identity",), self._publisher.instance_id)

    def _recent(self, question: tuple[str, ...], ask: Callable[[], _T]) -> _T:
        """The broker's answer to ``question`` if one came within ``ANSWER_REUSE_SECONDS``,
        else ``ask()``'s. A failure is not kept: the next caller asks again."""
        now = self._clock()
        known = self._answers.get(question)
        if known is not None and now - known[0] < ANSWER_REUSE_SECONDS:
            return cast(_T, known[1])
        with self._turns:
            answer = ask()
        self._answers[question] = (now, answer)
        return answer

    def messages_accounted_for(self, queue: str, *, taken_within_seconds: float) -> set[str] | None:
        with self._turns:
            return self._publisher.messages_accounted_for(
                queue, taken_within_seconds=taken_within_seconds
            )

    def messages_held(self, queue: str, *, taken_within_seconds: float) -> int | None:
        with self._turns:
            return self._publisher.messages_held(queue, taken_within_seconds=taken_within_seconds)

    def close(self) -> None:
        """Nothing: other policies may still publish through it (see ``detach``)."""

    def shut(self) -> None:
        with self._turns:
            self._publisher.close()


_shared: shared_by_key.SharedByKey[tuple[str, str], SharedPublisher] = shared_by_key.SharedByKey(
    close_value=SharedPublisher.shut
)


def _key(url: str, transport_options: Mapping[str, Any] | None) -> tuple[str, str]:
    return url, repr(sorted((transport_options or {}).items()))


def attach(url: str, *, transport_options: Mapping[str, Any] | None = None) -> SharedPublisher:
    """The shared publisher of ``url`` with the app's ``transport_options``; every ``attach``
    is matched by one ``detach``."""
    return _shared.attach(
        _key(url, transport_options),
        open_value=lambda: SharedPublisher(url, transport_options=transport_options),
    )


def detach(shared: SharedPublisher) -> None:
    _shared.detach(shared.key, shared)
