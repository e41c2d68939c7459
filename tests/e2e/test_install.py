"""Install the way a user does, then prove the install works with exactly the rights it grants.

``helm install`` (one namespace, and the whole cluster) and ``kubectl apply -f manifests/``
put the chart's objects into the real apiserver. The installed Deployment is scaled to zero
and the operator runs out of cluster instead, as a real process with the Deployment's own
arguments (scope, peering, ``POD_ID``) and a token of the installed ServiceAccount
(``kubectl create token``): every request it makes can then be checked against exactly
the rights the chart grants (test_in_cluster.py runs the same Deployment as a real Pod).
It then does the whole job — Secrets and a policy applied, every entry processed by real
celery workers (Pods on the devstack node), ``kubectl get processingstatus`` showing them
succeeded, a hanging entry rescued by the pod-restart hook after the kubelet restarted its
worker's container, and told in an Event, the policy deleted again (kopf's finalizer
removed) — and its log must hold no permission error. The log alone would prove little:
the pod watch and Events are best effort and retry or drop a refusal quietly, hence the
rescue. Real requests with the same token show what it
is refused; ``helm upgrade`` and ``helm uninstall`` leave nothing behind but the CRDs, which
are kept by design (deleting a CRD deletes every policy).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from e2e_support import (
    OUR_CRDS,
    PERMISSION_ERROR,
    OperatorProcess,
    adopt_crds,
    apply_policy,
    get_json,
    ledger_rows,
    policy_events,
    policy_manifest,
    processingstatus_table,
    seed,
    tally,
    unprocessed,
    wait_for,
)

from celery_app.demo import schema
from devstack import kube as devstack_kube
from devstack import workers

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "celery-reconciler"
MANIFESTS = ROOT / "manifests"
RELEASE = "install-e2e"
FULLNAME = f"{RELEASE}-celery-reconciler"
ENTRIES = 40
# Every kind the chart can create, to find what an uninstall left behind.
RELEASE_KINDS = (
    "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,"
    "clusterroles,clusterrolebindings,poddisruptionbudgets,kopfpeerings,clusterkopfpeerings,"
    "customresourcedefinitions"
)


@contextlib.contextmanager
def helm_installed(
    kube: devstack_kube.ControlPlane, *, namespace: str, watched: list[str]
) -> Iterator[None]:
    """``helm install`` the chart; uninstalled at the end unless the test did it already."""
    adopt_crds(kube, release=RELEASE, namespace=namespace)
    kube.helm(
        "install", RELEASE, str(CHART), "-n", namespace,
        "--set-json", f"watch.namespaces={json.dumps(watched)}",
        "--set", "operator.replicaCount=0",
    )  # fmt: skip
    try:
        yield
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, check=False)


def operator_options(
    kube: devstack_kube.ControlPlane, *, namespace: str, deployment: str
) -> dict[str, Any]:
    """``start_operator`` keywords that mirror the installed Deployment's container args.

    The health and metrics ports are the fixture's own (free loopback ports); everything
    else must be understood here, so a new argument in the chart fails this test loudly."""
    found = get_json(kube, "-n", namespace, "get", "deployment", deployment)
    (container,) = found["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    assert args.pop(0) == "run"
    namespaces: list[str] = []
    peering: str | None = None
    passed_on: list[str] = []
    while args:
        arg = args.pop(0)
        if arg == "--namespace":
            namespaces.append(args.pop(0))
        elif arg == "--peering":
            peering = args.pop(0)
        elif arg in ("--liveness", "--metrics-port"):
            args.pop(0)
        elif arg == "--status-writes-per-second":
            passed_on += [arg, args.pop(0)]
        else:
            assert arg in ("--all-namespaces", "--standalone"), f"unknown operator arg {arg}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert sorted(env) == ["CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS", "POD_ID"], env
    return {
        "namespaces": tuple(namespaces),
        "peering": peering,
        "extra_args": passed_on,
        "extra_env": {
            "POD_ID": f"{deployment}-out-of-cluster",
            "CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS": env[
                "CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS"
            ],
        },
    }


@pytest.fixture
def run_the_whole_job(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    worker_pods: Callable[..., workers.WorkerPod],
    start_operator: Callable[..., OperatorProcess],
) -> Callable[..., None]:
    """``run_the_whole_job(operator_options=..., kubeconfig=...)`` in the test's namespace:
    the user's part (Secrets, policy) as admin; the rest is the operator's, under the token.

    Beyond dispatch, this covers what the operator does with Kubernetes only now and then and
    best effort (its pod watch retries and its Events are dropped quietly when refused): one
    entry hangs on a worker whose pod then restarts, and must be rescued by the pod hook —
    the lease is 10 minutes — and told in a ``Rescued`` Event.
    """

    def run(*, operator_options: dict[str, Any], kubeconfig: Path) -> None:
        seed(journal, ENTRIES)
        with psycopg.connect(journal, autocommit=True) as conn:
            schema.set_fault(conn, entry_id=1, kind="sleep", seconds=600)
        doomed = worker_pods("insights-worker-a")
        operator = start_operator(kubeconfig=kubeconfig, **operator_options)
        apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, lease_timeout="10m")
        wait_for(
            lambda: (
                unprocessed(journal) == 1
                and ledger_rows(journal, state="running", worker="insights-worker-a")
            ),
            timeout_seconds=60,
            what="all entries but the hanging one processed",
        )

        with psycopg.connect(journal, autocommit=True) as conn:
            schema.clear_fault(conn, entry_id=1)
        # The kubelet restarts the killed container and reports restartCount 1.
        doomed.kill()
        worker_pods("insights-worker-b")
        wait_for(
            lambda: unprocessed(journal) == 0,
            timeout_seconds=30,
            what="the pod hook to rescue the hanging entry (its lease has 10 minutes to go)",
        )
        table = wait_for(
            lambda: (
                (t := processingstatus_table(crds, namespace)).get("SUCCEEDED") == str(ENTRIES)
                and t
            ),
            timeout_seconds=60,
            what=f"kubectl get processingstatus to show {ENTRIES} succeeded",
        )
        assert (table["PENDING"], table["IN-FLIGHT"], table["DEAD"]) == ("0", "0", "0")
        counted = tally(journal)
        assert (counted.processed, counted.duplicate_successes) == (ENTRIES, 0)
        events = policy_events(crds, namespace)
        assert "Rescued" in {e["reason"] for e in events}
        # Deleting waits for the operator to take its finalizer off (a patch under its token).
        crds.kubectl(
            "-n", namespace, "delete", "processingpolicy", "journal-insights", "--timeout=30s"
        )
        operator.stop()
        log = operator.process.log_path.read_text(errors="replace")
        complaints = [line for line in log.splitlines() if PERMISSION_ERROR.search(line)]
        assert complaints == [], "the operator was refused something it needs"

    return run


def assert_refused(kube: devstack_kube.ControlPlane, config: Path, *request: str) -> None:
    """A real request with the token: RBAC must refuse it (403: "... is forbidden: User ...
    cannot ...", worded a little differently by some kubectl verbs)."""
    answer = kube.kubectl(*request, kubeconfig=config, check=False)
    assert answer.returncode != 0, f"allowed: kubectl {' '.join(request)}"
    assert "forbidden: User" in answer.stderr and "cannot" in answer.stderr, answer.stderr


def assert_revoked(kube: devstack_kube.ControlPlane, config: Path, *request: str) -> None:
    """After an uninstall, what the token could read a minute ago is refused: Forbidden once
    the bindings are gone, Unauthorized once the apiserver has noticed its ServiceAccount is."""
    answer = kube.kubectl(*request, kubeconfig=config, check=False)
    assert answer.returncode != 0, f"still allowed: kubectl {' '.join(request)}"
    assert "forbidden: User" in answer.stderr or "(Unauthorized)" in answer.stderr, answer.stderr


def leftovers(kube: devstack_kube.ControlPlane, *, release: str, namespace: str) -> list[str]:
    """Objects of the release still in the apiserver (Helm's own release records included)."""
    labelled = kube.kubectl(
        "get", RELEASE_KINDS, "-A", "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
    ).stdout.split()
    records = kube.kubectl(
        "-n", namespace, "get", "secrets", "-l", f"owner=helm,name={release}", "-o", "name"
    ).stdout.split()
    return sorted(labelled + records)


KEPT_CRDS = sorted(f"customresourcedefinition.apiextensions.k8s.io/{name}" for name in OUR_CRDS)


def test_helm_install_in_one_namespace_works_with_exactly_its_rights_then_upgrades_and_uninstalls(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    other_namespace: str,
    run_the_whole_job: Callable[..., None],
    tmp_path: Path,
) -> None:
    with helm_installed(crds, namespace=namespace, watched=[namespace]):
        options = operator_options(crds, namespace=namespace, deployment=FULLNAME)
        assert options["namespaces"] == (namespace,) and options["peering"] == FULLNAME
        config = crds.service_account_kubeconfig(
            namespace=namespace, service_account=FULLNAME, path=tmp_path / "sa.kubeconfig"
        )
        run_the_whole_job(operator_options=options, kubeconfig=config)

        crds.kubectl(
            "-n", other_namespace, "create", "secret", "generic", "db", "--from-literal=dsn=x"
        )
        crds.kubectl("-n", namespace, "get", "secret", "demo-db", kubeconfig=config)
        policy_file = tmp_path / "policy.json"
        policy_file.write_text(policy_manifest(name="not-the-operators-to-create"))
        for request in (
            ["-n", other_namespace, "get", "secret", "db"],
            ["-n", namespace, "get", "secrets"],
            ["-n", namespace, "create", "secret", "generic", "stolen", "--from-literal=k=v"],
            ["-n", namespace, "delete", "pod", "insights-worker-b"],
            ["-n", namespace, "run", "shell", "--image=busybox"],
            ["-n", namespace, "get", "configmaps"],
            ["-n", namespace, "scale", "deployment", FULLNAME, "--replicas=0"],
            ["-n", namespace, "create", "-f", str(policy_file)],
            ["-n", other_namespace, "get", "processingpolicies"],
            ["-n", other_namespace, "get", "pods"],
            ["patch", "clusterkopfpeering", FULLNAME, "--type=merge", "-p", "{}"],
            ["create", "clusterrolebinding", "escalate", "--clusterrole=cluster-admin",
             f"--serviceaccount={namespace}:{FULLNAME}"],
            ["get", "nodes"],
        ):  # fmt: skip
            assert_refused(crds, config, *request)

        # Upgrade to serve a second namespace: its Role and KopfPeering appear, the same token
        # reads a Secret there by name (still not by listing), the Deployment's args follow.
        crds.helm(
            "upgrade", RELEASE, str(CHART), "-n", namespace, "--reuse-values",
            "--set-json", f"watch.namespaces={json.dumps([namespace, other_namespace])}",
        )  # fmt: skip
        crds.kubectl("-n", other_namespace, "get", "role,rolebinding,kopfpeering", FULLNAME)
        crds.kubectl("-n", other_namespace, "get", "secret", "db", kubeconfig=config)
        assert_refused(crds, config, "-n", other_namespace, "get", "secrets")
        upgraded = operator_options(crds, namespace=namespace, deployment=FULLNAME)
        assert upgraded["namespaces"] == (namespace, other_namespace)
        history = json.loads(crds.helm("history", RELEASE, "-n", namespace, "-o", "json").stdout)
        assert [(r["revision"], r["status"]) for r in history] == [
            (1, "superseded"),
            (2, "deployed"),
        ]

        uninstalled = crds.helm("uninstall", RELEASE, "-n", namespace)
        # CRDs are kept by design (crds.keep): deleting them would delete every policy.
        assert "kept due to the resource policy" in uninstalled.stdout + uninstalled.stderr
        # The Deployment's ReplicaSet and Pods go by garbage collection, shortly after.
        wait_for(
            lambda: leftovers(crds, release=RELEASE, namespace=namespace) == KEPT_CRDS,
            timeout_seconds=30,
            what="nothing but the kept CRDs left after helm uninstall",
        )
        assert_revoked(crds, config, "-n", namespace, "get", "secret", "demo-db")


def test_helm_install_for_the_whole_cluster_works_with_exactly_its_rights_and_uninstalls(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    other_namespace: str,
    run_the_whole_job: Callable[..., None],
    tmp_path: Path,
) -> None:
    home = other_namespace  # the operator's own namespace; the policy lives in another one
    with helm_installed(crds, namespace=home, watched=[]):
        options = operator_options(crds, namespace=home, deployment=FULLNAME)
        assert options["namespaces"] == () and options["peering"] == FULLNAME
        crds.kubectl("get", "clusterkopfpeering", FULLNAME)
        config = crds.service_account_kubeconfig(
            namespace=home, service_account=FULLNAME, path=tmp_path / "sa.kubeconfig"
        )
        run_the_whole_job(operator_options=options, kubeconfig=config)

        crds.kubectl("-n", namespace, "get", "secret", "demo-db", kubeconfig=config)
        for request in (
            ["get", "secrets", "--all-namespaces"],
            ["-n", namespace, "get", "secrets"],
            ["-n", namespace, "create", "secret", "generic", "stolen", "--from-literal=k=v"],
            ["-n", namespace, "delete", "pod", "insights-worker-b"],
            ["-n", namespace, "run", "shell", "--image=busybox"],
            ["get", "configmaps", "--all-namespaces"],
            ["-n", home, "scale", "deployment", FULLNAME, "--replicas=0"],
            ["-n", home, "create", "rolebinding", "escalate", "--clusterrole=cluster-admin",
             f"--serviceaccount={home}:{FULLNAME}"],
            ["delete", "crd", OUR_CRDS[0]],
            ["get", "nodes"],
        ):  # fmt: skip
            assert_refused(crds, config, *request)

        crds.helm("uninstall", RELEASE, "-n", home)
        wait_for(
            lambda: leftovers(crds, release=RELEASE, namespace=home) == KEPT_CRDS,
            timeout_seconds=30,
            what="nothing but the kept CRDs left after helm uninstall",
        )
        assert_revoked(crds, config, "-n", namespace, "get", "secret", "demo-db")


def test_kubectl_apply_of_the_manifests_gives_the_same_working_install(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    run_the_whole_job: Callable[..., None],
    tmp_path: Path,
) -> None:
    """The README's commands, in its order: CRDs first (install.yaml holds a
    ClusterKopfPeering, which needs its CRD established), then the install."""
    crds.kubectl("apply", "-f", str(MANIFESTS / "crds.yaml"))
    crds.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
    crds.kubectl("apply", "-f", str(MANIFESTS / "install.yaml"))
    home = name = "celery-reconciler"
    crds.kubectl("-n", home, "scale", "deployment", name, "--replicas=0")
    try:
        options = operator_options(crds, namespace=home, deployment=name)
        assert options["namespaces"] == () and options["peering"] == name
        config = crds.service_account_kubeconfig(
            namespace=home, service_account=name, path=tmp_path / "sa.kubeconfig"
        )
        run_the_whole_job(operator_options=options, kubeconfig=config)
        assert_refused(crds, config, "get", "secrets", "--all-namespaces")
        assert_refused(crds, config, "-n", namespace, "delete", "pod", "insights-worker-b")
    finally:
        # The README's way to remove it and keep the CRDs (and so every policy).
        crds.kubectl("delete", "namespace", home, "--timeout=60s", check=False)
        crds.kubectl(
            "delete", "clusterrole,clusterrolebinding,clusterkopfpeering",
            "-l", f"app.kubernetes.io/instance={name}", check=False,
        )  # fmt: skip
    assert leftovers(crds, release=name, namespace=home) == KEPT_CRDS
