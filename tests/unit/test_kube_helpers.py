from __future__ import annotations

import datetime
import threading
import types
from typing import Any

import kubernetes
import pytest

from celery_reconciler import kube, policy


def _workers(
    labels: dict[str, str] | None = None,
    *expressions: tuple[str, str, tuple[str, ...]],
) -> policy.Workers:
    return policy.Workers(
        match_labels=tuple(sorted((labels or {}).items())),
        match_expressions=tuple(
            policy.LabelSelectorRequirement(key=key, operator=operator, values=values)
            for key, operator, values in expressions
        ),
    )


def test_label_selector_covers_labels_and_expressions() -> None:
    workers = _workers(
        {"app": "insights-worker", "tier": "celery"},
        ("track", "In", ("stable", "canary")),
        ("env", "NotIn", ("dev",)),
        ("example.com/managed", "Exists", ()),
        ("legacy", "DoesNotExist", ()),
    )
    assert kube.label_selector(workers) == (
        "app=insights-worker,tier=celery,track in (stable,canary),env notin (dev),"
        "example.com/managed,!legacy"
    )


HOSTILE_KEYS = [
    "app,tier",  # a second requirement
    "app!=x,app",  # a negation
    "app in (a),x",  # a set
    "!app",
    "app=x",
    "app x",
    "app\n",
    "app)",
    "(app",
    "",
    "a" * 64,  # name longer than 63
    "Example.com/app",  # prefix must be lower case
    ("a" * 254) + "/app",  # prefix longer than 253
    "/app",
    "app/",
    "-app",
    "app-",
    "\uff41pp",  # fullwidth a
    "app\u200b",  # zero-width space
    "a/b/c",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_label_selector_refuses_hostile_keys_in_every_position(key: str) -> None:
    for workers in (
        _workers({key: "x"}),
        _workers(None, (key, "In", ("x",))),
        _workers(None, (key, "NotIn", ("x",))),
        _workers(None, (key, "Exists", ())),
        _workers(None, (key, "DoesNotExist", ())),
    ):
        with pytest.raises(kube.InvalidLabelSelector):
            kube.label_selector(workers)


@pytest.mark.parametrize("value", ["a,b", "a)", "x notin (y", "a b", "-a", "a" * 64, "é", "a\n"])
def test_label_selector_refuses_hostile_values(value: str) -> None:
    with pytest.raises(kube.InvalidLabelSelector):
        kube.label_selector(_workers({"app": value}))
    with pytest.raises(kube.InvalidLabelSelector):
        kube.label_selector(_workers(None, ("app", "In", ("ok", value))))


@pytest.mark.parametrize(
    "requirement",
    [("app", "In", ()), ("app", "NotIn", ()), ("app", "Exists", ("x",)), ("app", "Like", ("x",))],
)
def test_label_selector_refuses_operators_with_the_wrong_values(
    requirement: tuple[str, str, tuple[str, ...]],
) -> None:
    with pytest.raises(kube.InvalidLabelSelector):
        kube.label_selector(_workers(None, requirement))


def test_label_selector_accepts_empty_values_and_longest_names() -> None:
    key = ("a" * 253) + "/" + ("b" * 63)
    assert kube.label_selector(_workers({key: ""})) == f"{key}="


def restart_counts(pod: kube.WorkerPod) -> dict[str, int]:
    return {container.name: container.restart_count for container in pod.containers}


def test_pod_from_body_reads_both_client_and_kopf_shapes() -> None:
    camel = {
        "metadata": {"name": "w-1", "uid": "u1"},
        "status": {"containerStatuses": [{"name": "worker", "restartCount": 2}]},
    }
    snake = {
        "metadata": {"name": "w-1", "uid": "u1"},
        "status": {"container_statuses": [{"name": "worker", "restart_count": 2}]},
    }
    assert kube.pod_from_body(camel) == kube.pod_from_body(snake)
    assert restart_counts(kube.pod_from_body(camel)) == {"worker": 2}
    assert restart_counts(kube.pod_from_body({"metadata": {"name": "p"}})) == {}


def test_pod_from_body_reads_container_ids_and_start_times_in_both_spellings() -> None:
    started = datetime.datetime(2026, 11, 25, 18, 0, tzinfo=datetime.UTC)
    watched = {
        "metadata": {"name": "w", "uid": "u1"},
        "status": {
            "containerStatuses": [
                {
                    "name": "worker",
                    "restartCount": 1,
                    "containerID": "containerd://" + "a" * 64,
                    "state": {"running": {"startedAt": "2026-11-25T18:00:00Z"}},
                },
                {"name": "waiting", "restartCount": 3, "state": {"waiting": {}}},
            ]
        },
    }
    listed = {
        "metadata": {"name": "w", "uid": "u1"},
        "status": {
            "container_statuses": [
                {
                    "name": "worker",
                    "restart_count": 1,
                    "container_id": "containerd://" + "a" * 64,
                    "state": {"running": {"started_at": started}},
                }
            ]
        },
    }
    worker = kube.pod_from_body(watched).containers[0]
    assert worker == kube.pod_from_body(listed).containers[0]
    assert (worker.container_id, worker.started_at) == ("a" * 64, started)
    waiting = kube.pod_from_body(watched).containers[1]
    assert (waiting.container_id, waiting.started_at, waiting.restart_count) == (None, None, 3)


class _EmptyWatchResponse:
    """A watch the server accepted and ended at its timeout with no event."""

    status = 200

    def stream(self, **_: Any) -> list[bytes]:
        return []

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class _RefusingCore:
    """A CoreV1Api whose pod listing the API refuses, then allows (and its watch)."""

    def __init__(self, stopping: threading.Event, failures: int) -> None:
        self.stopping = stopping
        self.failures = failures

    def list_namespaced_pod(self, namespace: str, **arguments: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise kubernetes.client.ApiException(status=400, reason="Bad Request")
        if arguments.get("watch"):
            self.stopping.set()
            return _EmptyWatchResponse()
        return types.SimpleNamespace(items=[], metadata=types.SimpleNamespace(resource_version="1"))


def test_a_refused_pod_watch_is_reported_and_so_is_its_recovery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stopping = threading.Event()
    monkeypatch.setattr(kube, "_core", lambda: _RefusingCore(stopping, failures=1))
    monkeypatch.setattr(stopping, "wait", lambda timeout=None: False)  # no 2 s pause
    heard: list[str | None] = []
    kube.watch_worker_pods(
        namespace="mindjourney",
        label_selector="app=insights-worker",
        on_event=lambda event_type, pod: None,
        on_health=heard.append,
        stopping=stopping,
    )
    assert len(heard) == 2
    assert heard[0] is not None and "HTTP 400" in heard[0] and "app=insights-worker" in heard[0]
    assert heard[1] is None


class _ListsButCannotWatchCore:
    """A CoreV1Api whose pod listing works while the API refuses every watch of it
    (RBAC with ``list`` on pods and no ``watch``)."""

    def __init__(self, stopping: threading.Event, watches: int) -> None:
        self.stopping = stopping
        self.watches = watches

    def list_namespaced_pod(self, namespace: str, **arguments: Any) -> Any:
        if arguments.get("watch"):
            self.watches -= 1
            if self.watches == 0:
                self.stopping.set()
            raise kubernetes.client.ApiException(status=403, reason="Forbidden")
        return types.SimpleNamespace(items=[], metadata=types.SimpleNamespace(resource_version="1"))


def test_a_pod_watch_refused_while_its_listing_works_is_reported_once_and_never_as_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each retry lists (allowed) before it watches (refused): a recovery reported at every
    listing would flap the policy between Degraded and Ready for as long as it lasts."""
    stopping = threading.Event()
    monkeypatch.setattr(kube, "_core", lambda: _ListsButCannotWatchCore(stopping, watches=3))
    monkeypatch.setattr(stopping, "wait", lambda timeout=None: False)  # no back-off pause
    heard: list[str | None] = []
    kube.watch_worker_pods(
        namespace="mindjourney",
        label_selector="app=insights-worker",
        on_event=lambda event_type, pod: None,
        on_health=heard.append,
        stopping=stopping,
    )
    assert len(heard) == 1
    assert heard[0] is not None and "HTTP 403" in heard[0] and "watch on pods" in heard[0]
