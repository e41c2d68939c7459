from __future__ import annotations

import datetime

from celery_reconciler import kube


def test_label_selector_string_covers_labels_and_expressions() -> None:
    selector = {
        "matchLabels": {"app": "insights-worker", "tier": "celery"},
        "matchExpressions": [
            {"key": "track", "operator": "In", "values": ["stable", "canary"]},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "managed", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    }
    assert kube.label_selector_string(selector) == (
        "app=insights-worker,tier=celery,track in (stable,canary),env notin (dev),managed,!legacy"
    )


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
    assert kube.pod_from_body(camel).restart_counts == {"worker": 2}
    assert kube.pod_from_body({"metadata": {"name": "p"}}).restart_counts == {}


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
