"""The Grafana dashboard in the chart graphs exactly the metrics the operator exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import prometheus_client

from celery_reconciler import metrics

DASHBOARD = (
    Path(__file__).resolve().parents[2]
    / "charts"
    / "celery-reconciler"
    / "dashboards"
    / "celery-reconciler.json"
)
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def exported_metric_names() -> set[str]:
    return {
        value.describe()[0].name
        for value in vars(metrics).values()
        if isinstance(value, prometheus_client.metrics.MetricWrapperBase)
    }


def graphed_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = set()
    for expression in expressions:
        for name in re.findall(r"celery_reconciler_[a-z_]+", expression):
            for suffix in SUFFIXES:
                name = name.removesuffix(suffix)
            names.add(name)
    return names


def test_every_exported_metric_is_graphed_and_nothing_else() -> None:
    assert graphed_metric_names() == exported_metric_names()


def test_every_query_filters_by_the_dashboard_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert 'namespace=~"$namespace", policy=~"$policy"' in target["expr"], target
