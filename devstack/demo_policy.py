"""The demo's ProcessingPolicy and its two Secrets, applied to a cluster as a user would.

The e2e tests and the Pod rescue benchmark (``benchmarks.pod_rescue``) run the same user's
part — the Secrets naming the database and the broker, then a policy over the demo's
``journal_entry`` whose ``workers.podSelector`` picks the worker Pods — so it lives here, once.
"""

from __future__ import annotations

import json
from typing import Any

from celery_app.demo import schema
from devstack import kube

WORKER_LABELS = {"app": "insights-worker"}
POLICY_NAME = "journal-insights"


def secrets_manifest(*, dsn: str, broker_url: str) -> str:
    items = schema.secrets(dsn=dsn, broker_url=broker_url)
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def policy_manifest(name: str = POLICY_NAME, **spec_overrides: Any) -> str:
    spec = schema.policy_spec(
        sweep_interval=spec_overrides.pop("sweep_interval", "30s"),
        lease_timeout=spec_overrides.pop("lease_timeout", "10m"),
        retry=spec_overrides.pop("retry", None),
    )
    spec["workers"] = {"podSelector": {"matchLabels": WORKER_LABELS}}
    spec.update(spec_overrides)
    return json.dumps(
        {
            "apiVersion": "celery-reconciler.io/v1alpha1",
            "kind": "ProcessingPolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def apply_policy(
    plane: kube.ControlPlane,
    namespace: str,
    *,
    dsn: str,
    broker_url: str,
    **spec_overrides: Any,
) -> None:
    """The user's part: the two Secrets, then a ProcessingPolicy naming them."""
    apply_secrets(plane, namespace, dsn=dsn, broker_url=broker_url)
    plane.kubectl("-n", namespace, "apply", "-f", "-", input=policy_manifest(**spec_overrides))


def apply_secrets(plane: kube.ControlPlane, namespace: str, *, dsn: str, broker_url: str) -> None:
    """Create or fix the two Secrets a policy names (``demo-db`` and ``demo-broker``)."""
    plane.kubectl(
        "-n", namespace, "apply", "-f", "-", input=secrets_manifest(dsn=dsn, broker_url=broker_url)
    )
