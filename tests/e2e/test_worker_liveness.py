"""A worker container frozen as a whole is stopped by the kubelet, through its liveness probe.

Issue 21, on the test bed's real node (kubelet, containerd, runc) running the project's
image. Inside a frozen container nobody can act — not a body's watchdog, not the worker's
guardian — so the worker Pod carries the chart's exec liveness probe
(``celery_reconciler_worker.probe``), which fails once the guardian's tick is older than half
the heartbeat timeout. Freezing every process of the container (SIGSTOP) must end in the
kubelet restarting it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
from e2e_support import WORKER_LABELS, wait_for

from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import workers

pytestmark = pytest.mark.e2e

HEARTBEAT_TIMEOUT_SECONDS = 6


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (the worker, its pool, its guardian)."""
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    found, frontier = {pid}, [pid]
    while frontier:
        for child in children.get(frontier.pop(), set()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def test_a_worker_container_frozen_as_a_whole_is_restarted_by_the_kubelet(
    crds: devstack_kube.ControlPlane,
    node: devstack_node.Node,
    namespace: str,
    journal: str,
    redis_url: str,
) -> None:
    pod = workers.start_worker_pod(
        node=node,
        namespace=namespace,
        pod_name="frozen-worker",
        labels=WORKER_LABELS,
        broker_url=redis_url,
        dsn=journal,
        concurrency=1,
        extra_env={"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_SECONDS)},
    )
    try:
        frozen = descendants(pod.main_pid())
        # The precondition: the worker, its pool process and its guardian, all stopped.
        assert len(frozen) >= 3, frozen
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        wait_for(
            lambda: {state(pid) for pid in frozen} <= {"T", "gone"},
            timeout_seconds=10,
            what="every process of the container stopped",
        )
        wait_for(
            lambda: pod.restart_count() >= 1,
            timeout_seconds=120,
            what="the kubelet to restart the frozen container (its liveness probe failing)",
        )
        terminated = pod.container_status().get("lastState", {}).get("terminated", {})
        assert terminated.get("exitCode") == 137, terminated  # killed, not exited
        events = json.loads(
            crds.kubectl(
                "-n", namespace, "get", "events", "-o", "json",
                "--field-selector", f"involvedObject.name={pod.name}",
            ).stdout
        )  # fmt: skip
        reasons = [event.get("message", "") for event in events["items"]]
        assert any("Liveness probe failed" in message for message in reasons), reasons
        # The new container runs and passes its probe (no second restart meanwhile).
        pod.wait_ready(restarts=1)
    finally:
        pod.delete(grace_seconds=1, wait=True)
