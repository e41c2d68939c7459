"""The list-then-watch loop's decisions, against a scripted listing and stream (no server):
410 Gone relists at once, other refusals are reported once and cleared only by an accepted
watch, bookmarks move the resourceVersion, failures back off. The loop against a real API
server is proven by the e2e tests of the pod watch and the member Leases."""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from celery_reconciler import watching


def pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": version}}


def event(event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": event_type, "object": obj, "raw_object": obj}


def error_event(code: int, reason: str = "Expired") -> dict[str, Any]:
    status = {"kind": "Status", "code": code, "reason": reason, "message": "too old"}
    return {"type": "ERROR", "object": status, "raw_object": status}


class Script:
    """A listing and a stream that play their parts in order, then stop the watch.

    Each watch is a list of events (then the server ends it), or an exception it raises."""

    def __init__(self, *, listings: list[list[dict[str, Any]]], watches: list[Any]) -> None:
        self.listings = listings
        self.watches = watches
        self.stopping = threading.Event()
        self.listed = 0
        self.watched_from: list[str] = []
        self.waits: list[float] = []
        self.stopping.wait = self.wait  # type: ignore[method-assign]
        self.seen: list[tuple[str, str]] = []
        self.refusals: list[watching.Refused | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return self.stopping.is_set()

    def list_method(self, namespace: str, **_: Any) -> Any:
        items = self.listings[min(self.listed, len(self.listings) - 1)]
        self.listed += 1
        version = str(100 * self.listed)
        return types.SimpleNamespace(
            items=items, metadata=types.SimpleNamespace(resource_version=version)
        )

    def stream(self, list_method: Any, namespace: str, **arguments: Any) -> Iterator[Any]:
        self.watched_from.append(arguments["resource_version"])
        part = self.watches.pop(0)
        if not self.watches:
            self.stopping.set()
        if isinstance(part, BaseException):
            raise part
        yield from part

    def run(self, *, random: float = 1.0) -> None:
        watching.list_then_watch(
            list_method=self.list_method,
            namespace="ns",
            label_selector="app=w",
            what="pods 'app=w' in namespace ns",
            consequence="until it works, nothing",
            rights="grant watch",
            on_event=lambda event_type, obj, _: self.seen.append(
                (event_type, obj["metadata"]["name"])
            ),
            on_refused=self.refusals.append,
            stopping=self.stopping,
            stream=self.stream,
            random=lambda: random,
        )


def test_an_error_event_410_relists_at_once_and_replays_the_listing() -> None:
    script = Script(
        listings=[[pod("a", "5")], [pod("a", "5"), pod("b", "150")]],
        watches=[[event("MODIFIED", pod("a", "120")), error_event(410)], []],
    )
    script.run()
    assert script.listed == 2
    assert script.seen == [("ADDED", "a"), ("MODIFIED", "a"), ("ADDED", "a"), ("ADDED", "b")]
    assert script.watched_from == ["100", "200"]  # each watch from its own listing
    assert script.waits == [] and script.refusals == []


def test_a_410_raised_by_the_client_relists_at_once() -> None:
    script = Script(
        listings=[[pod("a", "5")]],
        watches=[kubernetes.client.ApiException(status=410, reason="Gone"), []],
    )
    script.run()
    assert script.listed == 2 and script.seen == [("ADDED", "a"), ("ADDED", "a")]
    assert script.waits == [] and script.refusals == []


def test_an_error_event_of_another_code_is_reported_backed_off_and_cleared_by_a_watch() -> None:
    script = Script(
        listings=[[]],
        watches=[[error_event(500, "InternalError")], [event("ADDED", pod("a", "7"))]],
    )
    script.run()
    assert script.refusals == [
        watching.Refused(status=500, reason="InternalError: too old"),
        None,
    ]
    assert script.waits == [watching.RETRY_BACKOFF_SECONDS[0]]
    assert script.seen == [("ADDED", "a")]


def test_a_watch_the_server_ends_continues_from_the_last_version_bookmarks_included() -> None:
    script = Script(
        listings=[[]],
        watches=[
            [event("ADDED", pod("a", "101")), event("BOOKMARK", pod("", "150"))],
            [event("MODIFIED", pod("a", "160"))],
            [],
        ],
    )
    script.run()
    assert script.listed == 1
    assert script.watched_from == ["100", "150", "160"]
    assert script.seen == [("ADDED", "a"), ("MODIFIED", "a")]  # no bookmark handed on


def test_failures_back_off_step_by_step_and_an_accepted_watch_resets_it() -> None:
    refused = kubernetes.client.ApiException(status=403, reason="Forbidden")
    script = Script(
        listings=[[]],
        watches=[refused] * 5 + [[]] + [refused],
    )
    script.run()
    steps = watching.RETRY_BACKOFF_SECONDS
    assert script.waits == [*steps, steps[-1], steps[0]]
    forbidden = watching.Refused(status=403, reason="Forbidden")
    assert script.refusals == [forbidden, None, forbidden]  # once per refusal, not per retry


def test_a_connection_that_drops_is_retried_with_back_off_and_not_reported() -> None:
    script = Script(listings=[[]], watches=[ConnectionResetError("reset"), []])
    script.run()
    assert script.waits == [watching.RETRY_BACKOFF_SECONDS[0]]
    assert script.refusals == [] and script.listed == 2


@pytest.mark.parametrize("failures", [1, 2, 3, 4, 9])
def test_the_jittered_delay_keeps_at_least_half_of_its_step(failures: int) -> None:
    step = watching.RETRY_BACKOFF_SECONDS[min(failures, len(watching.RETRY_BACKOFF_SECONDS)) - 1]
    low = watching.retry_delay_seconds(failures, random=lambda: 0.0)
    high = watching.retry_delay_seconds(failures, random=lambda: 0.999999)
    assert low == step * watching.RETRY_JITTER_LOW_FRACTION
    assert step * watching.RETRY_JITTER_LOW_FRACTION <= high <= step


def test_an_error_event_first_in_an_accepted_watch_does_not_clear_a_refusal() -> None:
    """The server accepted the request, then sent only an ERROR: still refused, no flap."""
    script = Script(
        listings=[[]],
        watches=[
            [error_event(500, "InternalError")],
            [error_event(500, "InternalError")],
            [],
        ],
    )
    script.run()
    refused = watching.Refused(status=500, reason="InternalError: too old")
    assert script.refusals == [refused, None]
    assert script.waits == list(watching.RETRY_BACKOFF_SECONDS[:2])
