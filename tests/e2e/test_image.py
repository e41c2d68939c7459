"""The project's image, built from the Dockerfile, runs on a real node.

The image is what users deploy, and the editable install the other tests use can hide a
packaging mistake (a package the wheel leaves out, a harness it wrongly ships). So these
Pods run the image itself through containerd and runc: the product imports, the test
harness is absent, both entrypoints start, and a worker container killed with SIGKILL is
restarted by the kubelet — the event the operator's rescue is built on.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_support import get_json, wait_for

from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import workers

pytestmark = pytest.mark.e2e

PROBE = """
import importlib.metadata, importlib.util, celery
from celery.app.utils import find_app
import celery_app.demo, celery_reconciler, celery_reconciler_worker.reliable
assert isinstance(find_app("celery_app.demo"), celery.Celery)
print("demo-app-found", celery_app.demo.__file__)
print("worker-distribution", importlib.metadata.version("celery-reconciler-worker"),
      celery_reconciler_worker.__file__)
print("devstack-absent", importlib.util.find_spec("devstack") is None)
print("tests-absent", importlib.util.find_spec("tests") is None)
"""


def run_to_completion(
    node: devstack_node.Node, namespace: str, *, name: str, containers: list[dict[str, object]]
) -> dict[str, str]:
    """A Pod that runs once; its containers' logs once it Succeeded (or the failure)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "hostNetwork": True,
            "automountServiceAccountToken": False,
            "containers": [
                {"image": node.image.ref, "imagePullPolicy": "Never", **container}
                for container in containers
            ],
        },
    }
    node.plane.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))
    phase = wait_for(
        lambda: (
            get_json(node.plane, "-n", namespace, "get", "pod", name)["status"].get("phase")
            in ("Succeeded", "Failed")
            and get_json(node.plane, "-n", namespace, "get", "pod", name)["status"]
        ),
        timeout_seconds=120,
        what=f"Pod {name} to finish",
    )
    logs = {
        str(c["name"]): node.container_log(namespace=namespace, pod=name, container=str(c["name"]))
        for c in containers
    }
    assert phase["phase"] == "Succeeded", (phase, logs)
    return logs


def test_the_image_runs_the_packaged_product_without_the_test_harness(
    node: devstack_node.Node, namespace: str
) -> None:
    logs = run_to_completion(
        node,
        namespace,
        name="image-probe",
        containers=[
            {"name": "probe", "command": ["python", "-c", PROBE]},
            # The image's own ENTRYPOINT (celery-reconciler), as the chart runs it.
            {"name": "operator", "args": ["run", "--help"]},
            {"name": "worker", "command": ["celery"], "args": ["-A", "celery_app.demo", "report"]},
        ],
    )
    assert "demo-app-found /opt/venv/lib/" in logs["probe"]
    # The worker package arrives as its own distribution, a dependency of the operator's.
    worker_project = Path(__file__).resolve().parents[2] / "celery_app" / "pyproject.toml"
    version = tomllib.loads(worker_project.read_text())["project"]["version"]
    assert f"worker-distribution {version} /opt/venv/lib/" in logs["probe"]
    assert "devstack-absent True" in logs["probe"]
    assert "tests-absent True" in logs["probe"]
    assert "--all-namespaces" in logs["operator"]
    assert "include: ['celery_app.demo.tasks']" in logs["worker"]


def test_a_killed_worker_container_is_restarted_by_the_kubelet(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    worker = worker_pods("insights-worker-a")
    first = worker.container_status()["containerID"]
    worker.kill()
    worker.wait_ready(restarts=1)
    status = worker.container_status()
    assert status["containerID"] != first
    assert status["lastState"]["terminated"]["exitCode"] == 137
    rows = crds.kubectl("-n", namespace, "get", "pods", worker.name).stdout.splitlines()
    assert rows[1].split()[3] == "1", rows  # the RESTARTS column a person reads
