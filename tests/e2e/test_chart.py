"""The Helm chart against the real apiserver and helm: lint, render, install, least privilege.

Both RBAC scopes are exercised: the whole cluster (``watch.namespaces: []``, a ClusterRole)
and a list of namespaces (a Role in each). The privilege checks ask the apiserver's own RBAC
(``kubectl auth can-i`` as the chart's ServiceAccount, and a real token of it), so they test
what the rendered rules grant, not what we meant them to grant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_support import PERMISSION_ERROR

from celery_reconciler_worker import reliable
from devstack import kube as devstack_kube
from devstack import processes

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "celery-reconciler"
OUR_CRDS = ("processingpolicies.celery-reconciler.io", "processingstatuses.celery-reconciler.io")
KOPF_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
RELEASE = "chart-e2e"
FULLNAME = f"{RELEASE}-celery-reconciler"


def _template(kube: devstack_kube.ControlPlane, namespace: str, *values: str) -> str:
    return kube.helm("template", RELEASE, str(CHART), "-n", namespace, *values).stdout


def _docs(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def _scope_values(watched: list[str]) -> list[str]:
    return ["--set-json", f"watch.namespaces={json.dumps(watched)}"]


def _adopt_existing_crds(kube: devstack_kube.ControlPlane, namespace: str) -> None:
    """Let this release own CRDs another test applied with kubectl (as a user would do)."""
    for name in OUR_CRDS:
        if kube.kubectl("get", "crd", name, check=False).returncode == 0:
            kube.kubectl("label", "--overwrite", "crd", name, "app.kubernetes.io/managed-by=Helm")
            kube.kubectl(
                "annotate", "--overwrite", "crd", name,
                f"meta.helm.sh/release-name={RELEASE}",
                f"meta.helm.sh/release-namespace={namespace}",
            )  # fmt: skip


def _ensure_kopf_crds(kube: devstack_kube.ControlPlane) -> None:
    kube.kubectl("apply", "-f", str(CHART / "crds" / "kopf-peerings.yaml"))
    for name in KOPF_CRDS:
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set-json", 'watch.namespaces=["a","b"]', "--set", "demoWorker.enabled=true"],
        ["--set", "demoWorker.enabled=true", "--set", "demoWorker.keda.enabled=true"],
    ],
    ids=["cluster", "namespaced+demo", "demo+keda"],
)
def test_helm_lint_strict_is_clean(kube: devstack_kube.ControlPlane, values: list[str]) -> None:
    linted = kube.helm("lint", "--strict", str(CHART), *values, check=False)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "[WARNING]" not in linted.stdout and "[ERROR]" not in linted.stdout


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_rendered_chart_passes_server_side_dry_run(
    kube: devstack_kube.ControlPlane, namespace: str, other_namespace: str, scope: str
) -> None:
    _ensure_kopf_crds(kube)
    watched = [] if scope == "cluster" else [namespace, other_namespace]
    rendered = _template(
        kube, namespace, *_scope_values(watched),
        "--set", "demoWorker.enabled=true", "--set", "podDisruptionBudget.enabled=true",
    )  # fmt: skip
    applied = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert applied.returncode == 0, applied.stderr
    kinds = sorted({doc["kind"] for doc in _docs(rendered)})
    if scope == "cluster":
        assert "Role" not in kinds and "KopfPeering" not in kinds
        assert "ClusterKopfPeering" in kinds
    else:
        roles = [d["metadata"]["namespace"] for d in _docs(rendered) if d["kind"] == "Role"]
        assert sorted(roles) == sorted(watched)
        assert "ClusterKopfPeering" not in kinds


def test_values_schema_refuses_a_typo(kube: devstack_kube.ControlPlane, namespace: str) -> None:
    refused = kube.helm(
        "template", RELEASE, str(CHART), "-n", namespace, "--set", "operator.replicas=2",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "replicas" in refused.stderr


def test_several_replicas_without_peering_are_refused(
    kube: devstack_kube.ControlPlane, namespace: str
) -> None:
    refused = kube.helm(
        "template", RELEASE, str(CHART), "-n", namespace,
        "--set", "peering.enabled=false", "--set", "operator.replicaCount=2", check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "needs sharding.enabled or peering.enabled" in refused.stderr


def test_sharded_replicas_get_leases_in_the_release_namespace_only(
    kube: devstack_kube.ControlPlane, namespace: str, other_namespace: str
) -> None:
    sharded = ("--set", "sharding.enabled=true", "--set", "operator.replicaCount=3")
    deployment = _deployment(_template(kube, namespace, *sharded), FULLNAME)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert container["args"] == [
        "run", "--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz",
        "--metrics-port", "9090", "--sharding-namespace", namespace,
        "--sharding-group", FULLNAME, "--lease-seconds", "15",
        "--replica-selector", ",".join(f"{key}={value}" for key, value in selector.items()),
        "--status-writes-per-second", "20",
    ]  # fmt: skip
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in (
        container["env"]
    )
    # The proof on its member Lease (replica_proof): the others check it against this Pod.
    assert {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}} in (
        container["env"]
    )
    assert deployment["spec"]["replicas"] == 3
    _adopt_existing_crds(kube, namespace)
    kube.helm("install", RELEASE, str(CHART), "-n", namespace, *sharded)
    try:
        account = f"system:serviceaccount:{namespace}:{FULLNAME}"
        # watch: the replicas see each other's renewals as they happen (the takeover bound).
        for verb in ("get", "list", "watch", "create", "update"):
            assert _can(kube, account, verb, "leases.coordination.k8s.io", "-n", namespace)
            assert not _can(
                kube, account, verb, "leases.coordination.k8s.io", "-n", other_namespace
            )
        for verb in ("delete", "patch"):
            assert not _can(kube, account, verb, "leases.coordination.k8s.io", "-n", namespace)
        # The member Lease check: the replicas' own Pods, listed; a Lease that fails, an Event.
        assert _can(kube, account, "list", "pods", "-n", namespace)
        assert _can(kube, account, "create", "events", "-n", namespace)
        for verb in ("create", "delete", "patch"):
            assert not _can(kube, account, verb, "pods", "-n", namespace)
        # Active-active replicas use no kopf peering: no peering object, no right to one.
        assert kube.kubectl("get", "clusterkopfpeering", FULLNAME, check=False).returncode != 0
        assert not _can(kube, account, "patch", "clusterkopfpeerings.kopf.dev")
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, check=False)


def _deployment(rendered: str, name: str) -> dict[str, Any]:
    (found,) = [
        d for d in _docs(rendered) if d["kind"] == "Deployment" and d["metadata"]["name"] == name
    ]
    return found


def test_operator_args_follow_the_scope(kube: devstack_kube.ControlPlane, namespace: str) -> None:
    cluster = _deployment(_template(kube, namespace), FULLNAME)
    assert cluster["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "run", "--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz",
        "--metrics-port", "9090", "--peering", FULLNAME, "--status-writes-per-second", "20",
    ]  # fmt: skip
    env = {
        e["name"]: e.get("value")
        for e in cluster["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS"] == "20"
    namespaced = _deployment(
        _template(kube, namespace, *_scope_values(["a", "b"]), "--set", "peering.enabled=false"),
        FULLNAME,
    )
    assert namespaced["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "run", "--namespace", "a", "--namespace", "b", "--liveness",
        "http://0.0.0.0:8080/healthz", "--metrics-port", "9090", "--standalone",
        "--status-writes-per-second", "20",
    ]  # fmt: skip


def test_pods_meet_the_restricted_pod_security_standard(
    kube: devstack_kube.ControlPlane, namespace: str
) -> None:
    """PodSecurity admission enforces "restricted" on Pods (not Deployments): try each pod."""
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    rendered = _template(kube, namespace, "--set", "demoWorker.enabled=true")
    templates = [d["spec"]["template"] for d in _docs(rendered) if d["kind"] == "Deployment"]
    pods = [d for d in _docs(rendered) if d["kind"] == "Pod"]
    assert len(templates) == 2 and len(pods) == 1
    (account,) = [d for d in _docs(rendered) if d["kind"] == "ServiceAccount"]
    kube.kubectl("apply", "-f", "-", input=json.dumps(account))  # admission looks it up
    for template in [*templates, *pods]:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"psa-{uuid.uuid4().hex[:6]}", "namespace": namespace},
            "spec": template["spec"],
        }
        applied = kube.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
        )
        assert applied.returncode == 0, applied.stderr
        assert "violate" not in applied.stderr
    bad = json.loads(json.dumps(pod))
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    refused = kube.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False
    )
    assert refused.returncode != 0 and "restricted" in refused.stderr


def _can(
    kube: devstack_kube.ControlPlane, service_account: str, verb: str, resource: str, *extra: str
) -> bool:
    resource, _, subresource = resource.partition("/")
    if subresource:
        extra = (*extra, f"--subresource={subresource}")
    answer = kube.kubectl(
        "auth", "can-i", f"--as={service_account}", verb, resource, *extra, check=False
    )
    return answer.stdout.strip() == "yes"


@pytest.fixture
def installed(
    kube: devstack_kube.ControlPlane, namespace: str, other_namespace: str
) -> Iterator[tuple[str, str]]:
    _adopt_existing_crds(kube, namespace)
    kube.helm(
        "install", RELEASE, str(CHART), "-n", namespace,
        *_scope_values([namespace]), "--set", "demoWorker.enabled=true",
    )  # fmt: skip
    yield namespace, other_namespace
    kube.helm("uninstall", RELEASE, "-n", namespace, check=False)


def test_helm_install_upgrade_uninstall(
    kube: devstack_kube.ControlPlane, installed: tuple[str, str]
) -> None:
    namespace, other_namespace = installed
    service_account = f"system:serviceaccount:{namespace}:{FULLNAME}"
    listed = json.loads(kube.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in listed] == [(RELEASE, "deployed")]
    for name in (*OUR_CRDS, *KOPF_CRDS):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")
    kube.kubectl("-n", namespace, "get", "kopfpeering", FULLNAME)
    kube.kubectl("-n", namespace, "get", "deployment", f"{FULLNAME}-demo-worker")
    assert _can(kube, service_account, "get", "secrets", "-n", namespace)
    assert not _can(kube, service_account, "get", "secrets", "-n", other_namespace)

    # Upgrade to the cluster-wide scope: Roles go, the ClusterRole grows, peering moves.
    kube.helm("upgrade", RELEASE, str(CHART), "-n", namespace, *_scope_values([]))
    assert kube.kubectl("-n", namespace, "get", "role", FULLNAME, check=False).returncode != 0
    kube.kubectl("get", "clusterkopfpeering", FULLNAME)
    assert _can(kube, service_account, "get", "secrets", "-n", other_namespace)
    revisions = json.loads(kube.helm("history", RELEASE, "-n", namespace, "-o", "json").stdout)
    assert [r["revision"] for r in revisions] == [1, 2]

    uninstalled = kube.helm("uninstall", RELEASE, "-n", namespace)
    assert "kept due to the resource policy" in uninstalled.stdout + uninstalled.stderr
    for kind, name in [("deployment", FULLNAME), ("serviceaccount", FULLNAME)]:
        assert kube.kubectl("-n", namespace, "get", kind, name, check=False).returncode != 0
    assert kube.kubectl("get", "clusterrole", FULLNAME, check=False).returncode != 0
    assert kube.kubectl("get", "clusterkopfpeering", FULLNAME, check=False).returncode != 0
    for name in OUR_CRDS:
        kube.kubectl("get", "crd", name)  # kept: deleting them would delete every policy


# (verb, resource, in the watched namespace?) -> allowed; what the operator uses, and the
# nearest things it must not be able to do.
NAMESPACED_RIGHTS = [
    ("get", "processingpolicies.celery-reconciler.io", False),
    ("watch", "processingpolicies.celery-reconciler.io", True),
    ("patch", "processingpolicies.celery-reconciler.io", True),
    ("patch", "processingpolicies.celery-reconciler.io/status", True),
    ("create", "processingpolicies.celery-reconciler.io", False),
    ("delete", "processingpolicies.celery-reconciler.io", False),
    ("create", "processingstatuses.celery-reconciler.io", True),
    ("delete", "processingstatuses.celery-reconciler.io", True),
    ("get", "secrets", True),
    ("list", "secrets", False),
    ("watch", "secrets", False),
    ("create", "secrets", False),
    ("watch", "pods", True),
    ("delete", "pods", False),
    ("create", "pods", False),
    ("create", "events", True),
    ("create", "events.events.k8s.io", False),
    ("patch", "events", False),
    ("get", "pods", True),
    ("update", "processingpolicies.celery-reconciler.io/status", False),
    ("update", "processingpolicies.celery-reconciler.io/finalizers", False),
    ("get", "processingstatuses.celery-reconciler.io", False),
    ("patch", "kopfpeerings.kopf.dev", True),
    ("list", "configmaps", False),
    ("create", "deployments.apps", False),
]


def test_service_account_gets_only_what_the_operator_uses(
    kube: devstack_kube.ControlPlane, installed: tuple[str, str], tmp_path: Path
) -> None:
    namespace, other_namespace = installed
    service_account = f"system:serviceaccount:{namespace}:{FULLNAME}"
    wrong = [
        (verb, resource, watched)
        for verb, resource, watched in NAMESPACED_RIGHTS
        if _can(kube, service_account, verb, resource, "-n", namespace) != watched
    ]
    assert wrong == [], "in the watched namespace, these answers are wrong"
    elsewhere = [
        (verb, resource)
        for verb, resource, _ in NAMESPACED_RIGHTS
        if _can(kube, service_account, verb, resource, "-n", other_namespace)
    ]
    assert elsewhere == [], "outside the watched namespaces nothing may be allowed"
    assert _can(kube, service_account, "watch", "customresourcedefinitions.apiextensions.k8s.io")
    assert _can(kube, service_account, "list", "namespaces")
    assert not _can(kube, service_account, "get", "namespaces")
    assert not _can(kube, service_account, "patch", "clusterkopfpeerings.kopf.dev")

    # The same, through a real token of the ServiceAccount rather than impersonation.
    config = kube.service_account_kubeconfig(
        namespace=namespace, service_account=FULLNAME, path=tmp_path / "sa.kubeconfig"
    )
    kube.kubectl("-n", namespace, "create", "secret", "generic", "db", "--from-literal=dsn=x")
    kube.kubectl("-n", other_namespace, "create", "secret", "generic", "db", "--from-literal=dsn=x")
    kube.kubectl("-n", namespace, "get", "secret", "db", kubeconfig=config)
    for forbidden in (
        ["-n", other_namespace, "get", "secret", "db"],
        ["-n", namespace, "get", "secrets"],
        ["-n", namespace, "delete", "pods", "--all"],
    ):
        refused = kube.kubectl(*forbidden, kubeconfig=config, check=False)
        assert refused.returncode != 0 and "Forbidden" in refused.stderr, forbidden


def test_cluster_scope_grants_the_same_rules_everywhere_and_nothing_more(
    kube: devstack_kube.ControlPlane, namespace: str, other_namespace: str
) -> None:
    rendered = _template(kube, namespace)
    (cluster_role,) = [
        d
        for d in _docs(rendered)
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == FULLNAME
    ]
    grants = {
        (group, resource, verb)
        for rule in cluster_role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("", "secrets", "get") in grants
    assert not {g for g in grants if g[1] == "secrets" and g[2] != "get"}
    assert not {g for g in grants if g[1] == "namespaces"}, "kopf lists no namespaces with -A"
    assert not {g for g in grants if "*" in g}
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in grants
    assert not {g for g in grants if g[1] == "kopfpeerings"}


# A minimal kopf operator doing what ours does through the framework: serve policies (status
# patch, finalizer, Events) and watch pods, with peering. Run under the chart's token, it
# proves the RBAC covers kopf itself; the real operator under the token is tested elsewhere.
MINIMAL_KOPF_OPERATOR = """
import kopf

@kopf.on.create("celery-reconciler.io", "v1alpha1", "processingpolicies")
def created(body, patch, **_):
    patch.status["observedGeneration"] = body.metadata.get("generation")
    kopf.info(body, reason="Seen", message="served under the chart's ServiceAccount")

@kopf.on.delete("celery-reconciler.io", "v1alpha1", "processingpolicies")
def deleted(**_):
    pass

@kopf.on.event("", "v1", "pods")
def pod_event(**_):
    pass
"""


def _wait_for(what: str, check: Callable[[], bool], timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_seconds} s waiting for {what}")


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_kopf_runs_under_the_chart_service_account_without_permission_warnings(
    kube: devstack_kube.ControlPlane, namespace: str, tmp_path: Path, scope: str
) -> None:
    _adopt_existing_crds(kube, namespace)
    kube.helm(
        "install", RELEASE, str(CHART), "-n", namespace,
        *_scope_values([] if scope == "cluster" else [namespace]),
    )  # fmt: skip
    operator_file = tmp_path / "minimal_operator.py"
    operator_file.write_text(MINIMAL_KOPF_OPERATOR)
    config = kube.service_account_kubeconfig(
        namespace=namespace, service_account=FULLNAME, path=tmp_path / "sa.kubeconfig"
    )
    port = processes.free_port()
    scope_args = ["--all-namespaces"] if scope == "cluster" else ["--namespace", namespace]
    log_path = tmp_path / "kopf.log"
    with log_path.open("w") as log:
        kopf = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "kopf"), "run", *scope_args,
                "--peering", FULLNAME, "--liveness", f"http://127.0.0.1:{port}/healthz",
                str(operator_file),
            ],
            env={**kube.env(kubeconfig=config), "POD_ID": "operator-0"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_for("kopf's liveness endpoint", lambda: processes.port_accepts(port))
        kube.kubectl("-n", namespace, "apply", "-f", str(ROOT / "manifests" / "samples"))

        def served() -> bool:
            status = kube.kubectl(
                "-n", namespace, "get", "ppol", "journal-insights",
                "-o", "jsonpath={.status.observedGeneration}",
            )  # fmt: skip
            return status.stdout == "1"

        _wait_for("the policy's status patched by kopf", served)
        events = kube.kubectl("-n", namespace, "get", "events", "-o", "json").stdout
        assert "served under the chart's ServiceAccount" in events
        peering_kind = "clusterkopfpeering" if scope == "cluster" else "kopfpeering"
        peers = kube.kubectl(
            "-n", namespace, "get", peering_kind, FULLNAME, "-o", "jsonpath={.status}"
        ).stdout
        assert "operator-0" in peers
        # The finalizer kopf added comes off again: deletion completes.
        kube.kubectl("-n", namespace, "delete", "ppol", "journal-insights", "--timeout=30s")
    finally:
        kopf.terminate()
        kopf.wait(timeout=30)
        kube.helm("uninstall", RELEASE, "-n", namespace, check=False)
    log_text = log_path.read_text()
    assert not PERMISSION_ERROR.search(log_text), log_text


def test_demo_worker_gets_the_environment_the_celery_app_reads(
    kube: devstack_kube.ControlPlane, namespace: str
) -> None:
    rendered = _template(kube, namespace, "--set", "demoWorker.enabled=true")
    worker = _deployment(rendered, f"{FULLNAME}-demo-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert [container["command"][0], *container["args"][:3]] == [
        "celery", "-A", "celery_app.demo", "worker",
    ]  # fmt: skip
    env_names = {variable["name"] for variable in container["env"]}
    assert env_names >= {"CELERY_BROKER_URL", reliable.DSN_ENVIRONMENT_VARIABLE}
    labels = worker["spec"]["template"]["metadata"]["labels"]
    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "processingpolicy.yaml").read_text())
    assert sample["spec"]["workers"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_people_with_view_or_edit_can_read_or_poke_policies(
    kube: devstack_kube.ControlPlane, namespace: str
) -> None:
    _adopt_existing_crds(kube, namespace)
    kube.helm("install", RELEASE, str(CHART), "-n", namespace, *_scope_values([namespace]))
    try:
        kube.kubectl("-n", namespace, "create", "serviceaccount", "viewer")
        kube.kubectl("-n", namespace, "create", "serviceaccount", "editor")
        kube.kubectl(
            "-n",
            namespace,
            "create",
            "rolebinding",
            "viewer",
            "--clusterrole=view",
            f"--serviceaccount={namespace}:viewer",
        )
        kube.kubectl(
            "-n",
            namespace,
            "create",
            "rolebinding",
            "editor",
            "--clusterrole=edit",
            f"--serviceaccount={namespace}:editor",
        )
        viewer = f"system:serviceaccount:{namespace}:viewer"
        editor = f"system:serviceaccount:{namespace}:editor"
        # The aggregation controller copies our rules into view/edit within a moment.
        _wait_for(
            "the view role to include processingstatuses",
            lambda: _can(
                kube, viewer, "list", "processingstatuses.celery-reconciler.io", "-n", namespace
            ),
        )
        _wait_for(
            "the edit role to include patching processingpolicies",
            lambda: _can(
                kube, editor, "patch", "processingpolicies.celery-reconciler.io", "-n", namespace
            ),
        )
        assert _can(kube, viewer, "get", "processingpolicies.celery-reconciler.io", "-n", namespace)
        assert not _can(
            kube, viewer, "patch", "processingpolicies.celery-reconciler.io", "-n", namespace
        )
        assert not _can(
            kube, viewer, "patch", "processingstatuses.celery-reconciler.io", "-n", namespace
        )
        assert not _can(
            kube, editor, "patch", "processingstatuses.celery-reconciler.io", "-n", namespace
        ), "only the operator writes ProcessingStatus"
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, check=False)
