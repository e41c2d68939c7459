"""Proof that the control plane under the e2e suite is a real one: CRDs, watches, RBAC, helm."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import kubernetes

from devstack import kube as devstack_kube

SMOKE_CHART = Path(__file__).parent / "charts" / "smoke"

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.smoke.celery-reconciler.io}
spec:
  group: smoke.celery-reconciler.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
"""


def test_crd_objects_are_validated_and_watched(
    kube: devstack_kube.ControlPlane, namespace: str
) -> None:
    kube.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    kube.kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.celery-reconciler.io")

    api = kubernetes.client.CustomObjectsApi(
        kubernetes.config.new_client_from_config(config_file=str(kube.kubeconfig))
    )
    seen: list[str] = []
    watch = kubernetes.watch.Watch()

    def watch_widgets() -> None:
        for event in watch.stream(
            api.list_namespaced_custom_object,
            "smoke.celery-reconciler.io",
            "v1",
            namespace,
            "widgets",
            timeout_seconds=20,
        ):
            seen.append(f"{event['type']} {event['object']['metadata']['name']}")
            if len(seen) == 1:
                watch.stop()

    watcher = threading.Thread(target=watch_widgets)
    watcher.start()
    widget = {
        "apiVersion": "smoke.celery-reconciler.io/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3},
    }
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(widget))
    watcher.join(30)
    assert seen == ["ADDED w1"]

    widget["spec"] = {"size": 0}
    refused = kube.kubectl(
        "-n", namespace, "apply", "-f", "-", input=json.dumps(widget), check=False
    )
    assert refused.returncode != 0
    assert "spec.size" in refused.stderr


def test_rbac_denies_a_service_account_without_a_role(
    kube: devstack_kube.ControlPlane, namespace: str, tmp_path: Path
) -> None:
    kube.kubectl("-n", namespace, "create", "serviceaccount", "nobody")
    config = kube.service_account_kubeconfig(
        namespace=namespace, service_account="nobody", path=tmp_path / "nobody.kubeconfig"
    )
    denied = kube.kubectl("-n", namespace, "get", "configmaps", kubeconfig=config, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr

    kube.kubectl(
        "-n", namespace, "create", "role", "read-cm", "--verb=list", "--resource=configmaps"
    )
    kube.kubectl(
        "-n",
        namespace,
        "create",
        "rolebinding",
        "read-cm",
        "--role=read-cm",
        f"--serviceaccount={namespace}:nobody",
    )
    allowed = None
    for _ in range(50):
        allowed = kube.kubectl("-n", namespace, "get", "configmaps", kubeconfig=config, check=False)
        if allowed.returncode == 0:
            break
    assert allowed is not None and allowed.returncode == 0, allowed.stderr


def test_helm_installs_and_uninstalls_a_chart(
    kube: devstack_kube.ControlPlane, namespace: str
) -> None:
    kube.helm(
        "install",
        "smoke",
        str(SMOKE_CHART),
        "-n",
        namespace,
        "--set",
        "greeting=hi",
        "--wait",
        "--timeout",
        "60s",
    )
    data = json.loads(
        kube.kubectl("-n", namespace, "get", "configmap", "smoke-smoke", "-o", "json").stdout
    )["data"]
    assert data == {"greeting": "hi"}
    listed = json.loads(kube.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in listed] == [("smoke", "deployed")]

    kube.helm("uninstall", "smoke", "-n", namespace, "--wait")
    gone = kube.kubectl("-n", namespace, "get", "configmap", "smoke-smoke", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_the_server_reports_the_pinned_version(kube: devstack_kube.ControlPlane) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.37.2"
    assert version["clientVersion"]["gitVersion"] == "v1.37.2"
