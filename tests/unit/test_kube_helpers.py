from __future__ import annotations

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
