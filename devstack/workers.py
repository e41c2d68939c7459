"""Real ``celery worker`` processes of the demo app, one per simulated worker pod.

There is no kubelet here, so a "worker pod" is two things the tests and the demo create
together: a Pod object in the apiserver (what the operator's pod-restart hook watches) and a
local ``celery worker`` whose ``HOSTNAME`` is that Pod's name and whose environment carries
what the Downward API would give it inside the pod (``downward_api_env``: the Pod's name,
namespace and uid), exactly as inside a real pod. The integration tests start
their workers here too, without the Pod, and with ``app`` pointed at a probe app when they
compare our messages with what Celery itself sends.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

from devstack import kube, processes


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
