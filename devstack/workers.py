"""Real ``celery worker`` processes of the demo app: as Pods on the devstack node, or local.

e2e tests and the demo run workers as real Pods of the project's image
(``start_worker_pod``): the kubelet restarts a killed container and reports it, and the
Downward API gives the worker its Pod's name, namespace and uid — what the operator's
pod-restart rescue acts on. Local ``celery worker`` processes (``start_worker``) serve the
integration tests, which need no Kubernetes, workers outside Kubernetes, and the one e2e
case a kubelet cannot stage: a restart report written by hand at a chosen moment, after
the restarted process started work (``register_pod``, ``report_running``); their
environment carries what the Downward API would give them (``downward_api_env``).
``app`` may point at a probe app when a test compares our messages with Celery's own.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from devstack import kube, processes
from devstack import node as devstack_node


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
    pool: str = "prefork",
    pod: PodIdentity | None = None,
) -> processes.ManagedProcess:
    """A local ``celery worker``; ``pod`` gives it the env a worker Pod gets from the
    Downward API, so pod events about that Pod end its incarnations."""
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=broker_url,
        CELERY_RECONCILER_DSN=dsn,
        HOSTNAME=pod_name,
        PYTHONUNBUFFERED="1",
    )
    if pod is not None:
        env.update(pod.downward_api_env())
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
            "--pool",
            pool,
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
class PodIdentity:
    """What the Downward API tells a worker container about its Pod."""

    name: str
    namespace: str
    uid: str

    def downward_api_env(self) -> dict[str, str]:
        return {
            "CELERY_RECONCILER_POD_NAME": self.name,
            "CELERY_RECONCILER_POD_NAMESPACE": self.namespace,
            "CELERY_RECONCILER_POD_UID": self.uid,
        }


def register_pod(
    plane: kube.ControlPlane, *, namespace: str, name: str, labels: dict[str, str]
) -> PodIdentity:
    """Create the Pod object standing for a local worker and report it running."""
    plane.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        input=json.dumps(pod_manifest(name=name, labels=labels)),
    )
    report_running(plane, namespace=namespace, name=name, started_at=kubernetes_now())
    return PodIdentity(
        name=name, namespace=namespace, uid=pod_uid(plane, namespace=namespace, name=name)
    )


def kubernetes_now() -> str:
    """Now, as the kubelet writes times (RFC 3339, whole seconds, rounded down)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_uid(plane: kube.ControlPlane, *, namespace: str, name: str) -> str:
    return plane.kubectl(
        "-n", namespace, "get", "pod", name, "-o", "jsonpath={.metadata.uid}"
    ).stdout.strip()


def downward_api_env(plane: kube.ControlPlane, *, namespace: str, name: str) -> dict[str, str]:
    """What a worker container gets from the Downward API (``fieldRef`` metadata.name,
    metadata.namespace, metadata.uid) — for a local worker standing for that Pod."""
    uid = pod_uid(plane, namespace=namespace, name=name)
    return PodIdentity(name=name, namespace=namespace, uid=uid).downward_api_env()


def report_running(
    plane: kube.ControlPlane,
    *,
    namespace: str,
    name: str,
    restart_count: int = 0,
    started_at: str | None = None,
) -> None:
    """Write ``pods/status`` as the kubelet would; a higher ``restart_count`` is a restart,
    ``started_at`` the (re)started container's ``state.running.startedAt``."""
    plane.kubectl(
        "-n",
        namespace,
        "patch",
        "pod",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(running_status(restart_count=restart_count, started_at=started_at)),
    )


def pod_manifest(*, name: str, labels: dict[str, str]) -> dict[str, object]:
    """A Pod object standing for a local worker; it stays Pending (no scheduler, no kubelet)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "containers": [{"name": "worker", "image": "celery-reconciler:demo"}],
            "automountServiceAccountToken": False,
        },
    }


def running_status(
    *,
    image: str = "celery-reconciler:demo",
    restart_count: int = 0,
    started_at: str | None = None,
) -> dict[str, object]:
    """The status a kubelet would report for a running worker container, for ``pods/status``."""
    running = {} if started_at is None else {"startedAt": started_at}
    return {
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "worker",
                    "image": image,
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": restart_count,
                    "state": {"running": running},
                }
            ],
        }
    }


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

    def instance_log(self, restart: int) -> str:
        """The log of the container's ``restart``-th restart alone."""
        return self.node.container_instance_log(
            namespace=self.namespace, pod=self.name, container="worker", restart=restart
        )

    def wait_ready(self, *, restarts: int | None = 0, timeout_seconds: float = 90) -> None:
        """Until the container's ``restarts``-th restart has logged celery's ``ready.``;
        ``None``: whichever instance runs (a benchmark on a loaded node, where the liveness
        probe may restart a worker that starts slowly, waits for one that serves)."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            status = self.container_status()
            count = status.get("restartCount")
            if (
                "running" in status.get("state", {})
                and count == (count if restarts is None else restarts)
                and " ready." in self.instance_log(int(count or 0))
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

    def container_pids(self) -> list[int]:
        """Host PIDs of every process of the running container: its main process's cgroup
        (the v1 ``pids`` hierarchy, which this test bed's node has), main process first.
        What freezing or killing a container as a whole must reach: the worker, its pool,
        its guardian, and any probe the kubelet is running in it."""
        main = self.main_pid()
        with open(f"/proc/{main}/cgroup", encoding="utf-8") as cgroups:
            lines = cgroups.read().splitlines()
        path = next(line.split(":", 2)[2] for line in lines if line.split(":", 2)[1] == "pids")
        with open(f"/sys/fs/cgroup/pids{path}/cgroup.procs", encoding="utf-8") as procs:
            others = [int(pid) for pid in procs.read().split() if int(pid) != main]
        return [main, *others]

    def kill(self) -> None:
        """SIGKILL the container's main process; the kubelet restarts the container."""
        self.node.kill_container(namespace=self.namespace, pod=self.name, container="worker")

    def delete(self, *, grace_seconds: int = 1, wait: bool = False) -> None:
        self.node.plane.kubectl(
            "-n", self.namespace, "delete", "pod", self.name,
            f"--grace-period={grace_seconds}", f"--wait={str(wait).lower()}", "--ignore-not-found",
        )  # fmt: skip


def delete_pods(pods: list[WorkerPod], *, grace_seconds: int = 1) -> None:
    """Delete these Pods and wait until each is gone: one ``kubectl delete`` per namespace,
    so the kubelet stops them side by side (one at a time cost about 5 s a Pod)."""
    by_namespace: dict[str, list[WorkerPod]] = {}
    for pod in pods:
        by_namespace.setdefault(pod.namespace, []).append(pod)
    for namespace, in_namespace in by_namespace.items():
        in_namespace[0].node.plane.kubectl(
            "-n", namespace, "delete", "pod", *(pod.name for pod in in_namespace),
            f"--grace-period={grace_seconds}", "--wait=true", "--ignore-not-found",
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
    app: str = "celery_app.demo",
    app_source: Path | None = None,
    wait: bool = True,
    liveness_probe: bool = True,
) -> WorkerPod:
    """Create a worker Pod (and the Secret holding its URLs) and wait until celery is ready.

    ``app`` may be a user's app that is not in the image: ``app_source`` (a directory of
    this checkout) is then mounted read-only and put on ``PYTHONPATH``, as a user's image
    would carry their code beside our ``celery_app`` integration. ``liveness_probe=False``
    is a user's worker Deployment without the documented probe: nothing then kills a
    container frozen as a whole."""
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
            app=app,
            liveness_probe=liveness_probe,
            app_source=app_source,
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
    if wait:
        worker.wait_ready()
    return worker


# The chart's demoWorker.livenessProbe (charts/celery-reconciler/values.yaml).
WORKER_LIVENESS_PROBE: dict[str, Any] = {
    "exec": {"command": ["python", "-m", "celery_reconciler_worker.probe"]},
    "initialDelaySeconds": 10,
    "periodSeconds": 3,
    "timeoutSeconds": 5,
    "failureThreshold": 2,
}


def worker_pod_manifest(
    *,
    name: str,
    labels: dict[str, str],
    image: str,
    env_secret: str,
    concurrency: int,
    queue: str,
    extra_env: dict[str, str],
    app: str = "celery_app.demo",
    app_source: Path | None = None,
    liveness_probe: bool = True,
) -> dict[str, Any]:
    """The chart's demo worker container as a bare Pod, on the test bed's host network."""

    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    # The same Downward API variables as the chart's demo worker: the Pod's name, namespace
    # and uid make the worker's incarnations end exactly when this Pod's container dies.
    # HOSTNAME, its display name, is the node's on the host network: set it to the Pod's.
    env: list[dict[str, Any]] = [
        {"name": "HOSTNAME", "valueFrom": field("metadata.name")},
        {"name": "CELERY_RECONCILER_POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "CELERY_RECONCILER_POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "CELERY_RECONCILER_POD_UID", "valueFrom": field("metadata.uid")},
        {"name": "CELERY_RECONCILER_CONTAINER_NAME", "value": "worker"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": key, "value": value} for key, value in extra_env.items()]
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if app_source is not None:
        # Mounted under its own name, so ``-A <package>.<module>`` imports it from there
        # while celery_app and its dependencies still come from the image.
        target = f"/opt/app-source/{app_source.name}"
        env.append({"name": "PYTHONPATH", "value": "/opt/app-source"})
        mounts.append({"name": "app-source", "mountPath": target, "readOnly": True})
        volumes.append(
            {"name": "app-source", "hostPath": {"path": str(app_source), "type": "Directory"}}
        )
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
                        app,
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
                    "volumeMounts": mounts,
                    # The chart's: a frozen or starved container is the kubelet's to kill.
                    **({"livenessProbe": WORKER_LIVENESS_PROBE} if liveness_probe else {}),
                }
            ],
            "volumes": volumes,
        },
    }
