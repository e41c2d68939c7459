"""The one reference count behind the shared pools, publishers and pod watches: a key's
value is opened by its first user, closed after its last, and a late subscriber to a pod
watch hears what the watch knows before any new event."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from celery_reconciler import kube, podwatch, shared_by_key


def test_a_value_is_opened_by_the_first_user_and_closed_after_the_last() -> None:
    opened: list[str] = []
    closed: list[object] = []
    shared: shared_by_key.SharedByKey[str, object] = shared_by_key.SharedByKey(
        close_value=closed.append
    )

    def attach(key: str) -> object:
        def open_value() -> object:
            opened.append(key)
            return object()

        return shared.attach(key, open_value=open_value)

    first, second = attach("a"), attach("a")
    assert first is second and opened == ["a"]
    shared.detach("a", first)
    assert closed == [] and shared.values() == [first]
    shared.detach("a", second)
    assert closed == [first] and shared.values() == []
    shared.detach("a", first)  # a detach too many closes nothing twice
    assert closed == [first]
    again = attach("a")
    assert again is not first and opened == ["a", "a"]
    shared.detach("a", first)  # the old value's detach leaves the new one alone
    assert shared.values() == [again] and closed == [first]


def test_a_late_subscriber_hears_the_known_pods_and_the_last_one_stops_the_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stopping: list[threading.Event] = []
    listed = threading.Event()

    def watch_worker_pods(**arguments: Any) -> None:
        stopping.append(arguments["stopping"])
        arguments["on_event"]("ADDED", kube.WorkerPod(name="w-1", uid="u1"))
        arguments["on_health"]("forbidden")
        listed.set()

    monkeypatch.setattr(kube, "watch_worker_pods", watch_worker_pods)
    heard: dict[str, list[tuple[str, str | None]]] = {"early": [], "late": []}

    def subscribe(who: str) -> podwatch.Subscription:
        return podwatch.subscribe(
            namespace="ns",
            label_selector="app=w",
            on_event=lambda event_type, pod: heard[who].append((event_type, pod.name)),
            on_health=lambda failure: heard[who].append(("health", failure)),
        )

    early = subscribe("early")
    assert listed.wait(timeout=10)
    late = subscribe("late")
    assert heard["early"] == heard["late"] == [("ADDED", "w-1"), ("health", "forbidden")]
    assert len(stopping) == 1  # one watch for both
    podwatch.unsubscribe(early)
    assert not stopping[0].is_set()
    podwatch.unsubscribe(late)
    podwatch.unsubscribe(late)  # twice is harmless
    assert stopping[0].is_set()
