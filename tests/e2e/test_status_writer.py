"""The status writer stops with its policy: a status that finds its policy gone is dropped.

Issue 22: after a policy was deleted, its last status waited in the writer, whose patch then
failed with HTTP 404 — and was put back and retried every 2 s for as long as the operator
ran (363 times in 12 minutes). Here the writer runs in this process against the real
apiserver.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import kubernetes
import pytest

from celery_reconciler import kube as operator_kube
from celery_reconciler import statuswriter
from devstack import kube as devstack_kube

pytestmark = pytest.mark.e2e

NAMESPACE = "default"


@pytest.fixture
def operator_client(crds: devstack_kube.ControlPlane) -> Iterator[None]:
    operator_kube.use_api_client(
        kubernetes.config.new_client_from_config(config_file=str(crds.kubeconfig))
    )
    yield
    operator_kube.use_api_client(None)


def apply_policy_named(kube: devstack_kube.ControlPlane, name: str) -> str:
    manifest = f"""
apiVersion: celery-reconciler.io/v1alpha1
kind: ProcessingPolicy
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  source:
    databaseSecretRef: {{name: db, key: dsn}}
    table: public.journal_entry
    idColumn: id
    pending: {{column: processed, equals: false}}
  task:
    name: demo.tasks.process_entry
    brokerSecretRef: {{name: broker, key: url}}
"""
    kube.kubectl("apply", "-f", "-", input=manifest)
    return kube.kubectl(
        "get", "processingpolicy", name, "-n", NAMESPACE, "-o", "jsonpath={.metadata.uid}"
    ).stdout.strip()


async def written_until_idle(writer: statuswriter.StatusWriter, *, give_up_seconds: float) -> bool:
    """Whether the writer ran out of work (nothing waiting, nothing being written)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_seconds
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        if writer.idle():
            return True
    return False


def test_a_status_for_a_deleted_policy_is_dropped_not_retried_forever(
    crds: devstack_kube.ControlPlane, operator_client: None
) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}"
    uid = apply_policy_named(crds, name)
    crds.kubectl("delete", "processingpolicy", name, "-n", NAMESPACE, "--wait=true")

    async def scenario() -> tuple[bool, int]:
        writer = statuswriter.StatusWriter()
        writer.submit(
            namespace=NAMESPACE,
            name=name,
            owner_uid=uid,
            policy_status={"conditions": [{"type": "Ready", "status": "True"}]},
            processing={"pending": 0},
        )
        # A retry waits statuswriter.RETRY_SECONDS: three of them fit in this wait.
        idle = await written_until_idle(writer, give_up_seconds=4 * statuswriter.RETRY_SECONDS)
        return idle, writer.writes

    idle, writes = asyncio.run(scenario())
    assert idle, "the writer still retries the status of a policy that no longer exists"
    assert writes == 0


def test_a_status_for_a_live_policy_is_written(
    crds: devstack_kube.ControlPlane, operator_client: None
) -> None:
    name = f"live-{uuid.uuid4().hex[:8]}"
    uid = apply_policy_named(crds, name)

    async def scenario() -> bool:
        writer = statuswriter.StatusWriter()
        writer.submit(
            namespace=NAMESPACE,
            name=name,
            owner_uid=uid,
            policy_status={"lastSweepTime": "2026-12-07T00:00:00Z"},
            processing={"pending": 7},
        )
        return await written_until_idle(writer, give_up_seconds=30)

    try:
        assert asyncio.run(scenario())
        written = operator_kube.get_processing_status(namespace=NAMESPACE, name=name)
        assert written is not None and written["status"]["pending"] == 7
    finally:
        crds.kubectl("delete", "processingpolicy", name, "-n", NAMESPACE, "--wait=false")
