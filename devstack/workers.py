"""Real ``celery worker`` processes of the demo app: as Pods on the devstack node, or local.

e2e tests and the demo run workers as real Pods of the project's image (``start_worker_pod``):
the kubelet restarts a killed container and reports it, which is what the operator's
pod-restart rescue watches for. The integration tests, which need no Kubernetes, start local
``celery worker`` processes (``start_worker``) whose ``HOSTNAME`` stands in for a pod name,
with ``app`` pointed at a probe app when they compare our messages with what Celery sends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from devstack import node as devstack_node
from devstack import processes


def start_worker(
    *,
    pod_name: str,
    broker_url: str,
    dsn: str,
    log_dir: Path,
    concurrency: int = 2,
    app: str = "celery_app.demo",
    queue: str = "insights",
    lease_seconds: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> processes.ManagedProcess:
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=broker_url,
        CELERY_RECONCILER_DSN=dsn,
        HOSTNAME=pod_name,
        PYTHONUNBUFFERED="1",
    )
    if lease_seconds is not None:
        env["DEMO_LEASE_SECONDS"] = str(lease_seconds)
    env.update(extra_env or {})
    worker = processes.ManagedProcess(
        name=f"worker:{pod_name}",
        argv=[
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-Q",
            queue,
            "-c",
            str(concurrency),
            "-n",
            f"{pod_name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "INFO",
        ],
        log_path=log_dir / f"worker-{pod_name}.log",
        env=env,
    )
    worker.start()
    worker.wait_until(
        lambda: " ready." in worker.log_path.read_text(errors="replace"),
        timeout_seconds=60,
        what="ready",
    )
    return worker


@dataclasses.dataclass(frozen=True)
class WorkerPod:
    """A demo worker running as a real Pod of the project's image on the devstack node."""

    node: devstack_node.Node
    namespace: str
    name: str

    def container_status(self) -> dict[str, Any]:
        return self.node.container_status(
            namespace=self.namespace, pod=self.name, container="worker"
        )

    def restart_count(self) -> int:
        return int(self.container_status().get("restartCount", 0))

    def log(self) -> str:
        return self.node.container_log(namespace=self.namespace, pod=self.name, container="worker")

    def wait_ready(self, *, restarts: int = 0, timeout_seconds: float = 90) -> None:
        """Until the container's ``restarts``-th restart has logged celery's ``ready.``."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            status = self.container_status()
            if (
                "running" in status.get("state", {})
                and status.get("restartCount") == restarts
                and self.log().count(" ready.") > restarts
            ):
                return
            time.sleep(0.2)
        raise processes.StartupFailed(
            f"worker Pod {self.name} not ready (restart {restarts}) after "
            f"{timeout_seconds:.0f}s; status {self.container_status()}; log:\n{self.log()[-3000:]}"
        )

    def main_pid(self) -> int:
        """The host PID of the running container's main process (celery's parent)."""
        return self.node.container_pid(self.container_status()["containerID"])

    def kill(self) -> None:
        """SIGKILL the container's main process; the kubelet restarts the container."""
        self.node.kill_container(namespace=self.namespace, pod=self.name, container="worker")

    def delete(self, *, grace_seconds: int = 1, wait: bool = False) -> None:
        self.node.plane.kubectl(
            "-n", self.namespace, "delete", "pod", self.name,
            f"--grace-period={grace_seconds}", f"--wait={str(wait).lower()}", "--ignore-not-found",
        )  # fmt: skip


def start_worker_pod(
    *,
    node: devstack_node.Node,
    namespace: str,
    pod_name: str,
    labels: dict[str, str],
    broker_url: str,
    dsn: str,
    concurrency: int = 2,
    queue: str = "insights",
    extra_env: dict[str, str] | None = None,
) -> WorkerPod:
    """Create a worker Pod (and the Secret holding its URLs) and wait until celery is ready."""
    plane = node.plane
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{pod_name}-env"},
        "stringData": {"CELERY_BROKER_URL": broker_url, "CELERY_RECONCILER_DSN": dsn},
    }
    manifests = [
        secret,
        worker_pod_manifest(
            name=pod_name,
            labels=labels,
            image=node.image.ref,
            env_secret=f"{pod_name}-env",
            concurrency=concurrency,
            queue=queue,
            extra_env=extra_env or {},
        ),
    ]
    plane.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}),
    )
    worker = WorkerPod(node=node, namespace=namespace, name=pod_name)
    worker.wait_ready()
    return worker


def worker_pod_manifest(
    *,
    name: str,
    labels: dict[str, str],
    image: str,
    env_secret: str,
    concurrency: int,
    queue: str,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    """The chart's demo worker container as a bare Pod, on the test bed's host network."""
    env: list[dict[str, Any]] = [
        # The worker names itself in the ledger by $HOSTNAME; a hostNetwork Pod's hostname
        # is the node's, so the Downward API gives it the Pod's name, as the chart does.
        {"name": "HOSTNAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": key, "value": value} for key, value in extra_env.items()]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "hostNetwork": True,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532},
            "containers": [
                {
                    "name": "worker",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["celery"],
                    "args": [
                        "-A",
                        "celery_app.demo",
                        "worker",
                        "-Q",
                        queue,
                        "-c",
                        str(concurrency),
                        "-n",
                        "celery@$(HOSTNAME)",
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                        "-l",
                        "INFO",
                    ],
                    "env": env,
                    "envFrom": [{"secretRef": {"name": env_secret}}],
                }
            ],
        },
    }
