"""The guard that stops an operator kopf left serving nothing (``served``)."""

from __future__ import annotations

import asyncio

import kopf

from celery_reconciler import kube, served

POLICIES = kopf.Resource(kube.GROUP, "v1alpha1", kube.POLICIES, namespaced=True)
PODS = kopf.Resource("", "v1", "pods", namespaced=True)


def _guard(watched: set[kopf.Resource]) -> bool:
    """Whether the guard stopped the operator, kopf having watched ``watched``."""
    stopped: list[bool] = []

    async def scenario() -> None:
        insights = served.new_insights()
        insights.watched_resources.update(watched)
        insights.ready_resources.set()
        await served.stop_unless_policies_are_served(
            insights=insights, stop=lambda: stopped.append(True), grace_seconds=0
        )

    asyncio.run(scenario())
    return bool(stopped)


def test_an_operator_that_serves_policies_runs_on() -> None:
    assert not _guard({POLICIES, PODS})


def test_an_operator_whose_policies_kopf_could_not_resolve_is_stopped() -> None:
    assert _guard({PODS})
    assert _guard(set())
