"""The operator as a local process against a devstack control plane (out of cluster).

The e2e tests and the chaos driver start it the same way: ``python -m celery_reconciler
run`` from this checkout, with a kubeconfig, kopf's ``/healthz`` on a free loopback port
(its readiness is what a start waits for) and metrics on another. Running it out of cluster
lets a test kill it with SIGKILL and start it again in a second, and give it a kubeconfig
whose server is a proxy the test can cut.
"""

from __future__ import annotations

import dataclasses
import sys
import urllib.request
from pathlib import Path

from devstack import kube, processes


@dataclasses.dataclass
class OperatorProcess:
    process: processes.ManagedProcess
    liveness_port: int
    metrics_port: int

    def metrics_text(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(timeout_seconds=20)


def healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
        return bool(response.status == 200)


def start(
    plane: kube.ControlPlane,
    *,
    log_dir: Path,
    kubeconfig: Path | None = None,
    namespaces: tuple[str, ...] = (),
    peering: str | None = None,
    name: str = "operator",
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    timeout_seconds: float = 60,
    sharding_namespace: str | None = None,
    verbose: bool = True,
) -> OperatorProcess:
    """Start the operator and wait until kopf answers ``/healthz``.

    ``sharding_namespace``: an active-active replica sharing the policies through Leases
    there (its ``--replica-name`` is ``name``), instead of kopf peering or standalone.
    ``verbose`` (the tests' default) logs at debug level; a benchmark measuring the
    operator's own cost turns it off."""
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
    ]
    argv += ["--verbose"] if verbose else []
    argv += [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
    if sharding_namespace is not None:
        argv += [f"--sharding-namespace={sharding_namespace}", f"--replica-name={name}"]
    else:
        argv += [f"--peering={peering}"] if peering else ["--standalone"]
    argv += extra_args or []
    env = plane.env(kubeconfig=kubeconfig)
    env.update(extra_env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    process = processes.ManagedProcess(
        name=f"{name}:{liveness_port}",
        argv=argv,
        log_path=log_dir / f"{name}-{liveness_port}.log",
        env=env,
    )
    process.start()
    process.wait_until(
        lambda: healthy(liveness_port), timeout_seconds=timeout_seconds, what="healthy (/healthz)"
    )
    return OperatorProcess(process, liveness_port, metrics_port)
