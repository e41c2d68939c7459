"""e2e fixtures: our CRDs installed into the real apiserver, and the operator as a real process.

The operator runs out-of-cluster (there is no kubelet to run its pod), with a kubeconfig —
the admin's by default, or a ServiceAccount token's for the least-privilege tests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import OperatorProcess, healthy

from devstack import kube as devstack_kube
from devstack import processes

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "charts" / "celery-reconciler" / "files" / "crds"


@pytest.fixture(scope="session")
def crds(kube: devstack_kube.ControlPlane) -> devstack_kube.ControlPlane:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
    kube.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/processingpolicies.celery-reconciler.io",
        "crd/processingstatuses.celery-reconciler.io",
    )
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
    ) -> OperatorProcess:
        liveness_port, metrics_port = processes.free_port(), processes.free_port()
        argv = [
            sys.executable,
            "-m",
            "celery_reconciler",
            "run",
            "--liveness",
            f"http://127.0.0.1:{liveness_port}/healthz",
            "--metrics-port",
            str(metrics_port),
            "--verbose",
        ]
        argv += [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
        argv += [f"--peering={peering}"] if peering else ["--standalone"]
        env = crds.env(kubeconfig=kubeconfig)
        env.update(extra_env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = processes.ManagedProcess(
            name=f"{name}:{liveness_port}",
            argv=argv,
            log_path=tmp_path / f"{name}-{liveness_port}.log",
            env=env,
        )
        process.start()
        process.wait_until(
            lambda: healthy(liveness_port), timeout_seconds=60, what="healthy (/healthz)"
        )
        operator = OperatorProcess(process, liveness_port, metrics_port)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()
