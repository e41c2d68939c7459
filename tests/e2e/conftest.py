"""e2e fixtures: our CRDs installed into the real apiserver, and the operator as a real process.

The operator runs out-of-cluster (there is no kubelet to run its pod), with a kubeconfig —
the admin's by default, or a ServiceAccount token's for the least-privilege tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from e2e_support import WORKER_LABELS, OperatorProcess

from celery_app.demo import schema
from celery_reconciler import kube as operator_kube
from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import operators, processes, workers


@pytest.fixture(scope="session")
def crds(kube: devstack_kube.ControlPlane) -> devstack_kube.ControlPlane:
    kube.install_crds()
    return kube


@pytest.fixture
def start_operator(
    crds: devstack_kube.ControlPlane, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(
        *,
        kubeconfig: Path | None = None,
        namespaces: tuple[str, ...] = (),
        peering: str | None = None,
        name: str = "operator",
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        sharding_namespace: str | None = None,
    ) -> OperatorProcess:
        operator = operators.start(
            crds,
            log_dir=tmp_path,
            kubeconfig=kubeconfig,
            namespaces=namespaces,
            peering=peering,
            name=name,
            extra_env=extra_env,
            extra_args=extra_args,
            sharding_namespace=sharding_namespace,
        )
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()


@pytest.fixture
def journal(database_dsn: str) -> str:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        schema.create_schema(conn)
    return database_dsn


@pytest.fixture
def local_workers(
    journal: str, redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., processes.ManagedProcess]]:
    """``local_workers(hostname, concurrency=2, extra_env=..., queue=...)``: a celery worker of
    the demo app with that ``HOSTNAME`` and no Pod object of its own; stopped at the end. For the
    cases a kubelet cannot stage (see devstack.workers); real workers are ``worker_pods``."""
    started: list[processes.ManagedProcess] = []

    def start(
        hostname: str,
        *,
        concurrency: int = 2,
        broker_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        queue: str = "insights",
    ) -> processes.ManagedProcess:
        worker = workers.start_worker(
            pod_name=hostname,
            broker_url=broker_url or redis_url,
            dsn=journal,
            log_dir=tmp_path,
            concurrency=concurrency,
            extra_env=extra_env,
            queue=queue,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def worker_pods(
    crds: devstack_kube.ControlPlane,
    node: devstack_node.Node,
    namespace: str,
    journal: str,
    redis_url: str,
) -> Iterator[Callable[..., workers.WorkerPod]]:
    """``worker_pods(name)``: a demo worker as a real Pod of the image, running on the node,
    with the Downward API env the chart gives it."""
    started: list[workers.WorkerPod] = []

    def start(
        pod_name: str,
        *,
        concurrency: int = 2,
        broker_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        liveness_probe: bool = True,
    ) -> workers.WorkerPod:
        worker = workers.start_worker_pod(
            node=node,
            namespace=namespace,
            pod_name=pod_name,
            labels=WORKER_LABELS,
            broker_url=broker_url or redis_url,
            dsn=journal,
            concurrency=concurrency,
            extra_env=extra_env,
            liveness_probe=liveness_probe,
        )
        started.append(worker)
        return worker

    yield start
    # Waited for: a worker Pod left running would take the next test's messages from the
    # session's shared Redis (and write to this test's database).
    workers.delete_pods(started, grace_seconds=1)


@pytest.fixture
def cli_shell(
    crds: devstack_kube.ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> Iterator[devstack_kube.ControlPlane]:
    """A person's shell for the CLI: the admin kubeconfig in $KUBECONFIG and no DSN in the
    environment, so ``explain`` must read it from the policy's Secret."""
    monkeypatch.setenv("KUBECONFIG", str(crds.kubeconfig))
    monkeypatch.delenv("CELERY_RECONCILER_DSN", raising=False)
    yield crds
    operator_kube.use_api_client(None)
