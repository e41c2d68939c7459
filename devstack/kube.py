"""A real Kubernetes control plane without Docker: etcd, kube-apiserver, kube-controller-manager.

Real here is everything our claims rest on — CRD schema and CEL validation, RBAC
(``--authorization-mode=Node,RBAC`` with ServiceAccount tokens from ``kubectl create
token``), watches, status subresources, and ownerReference garbage collection (that one
needs kube-controller-manager, which also creates the ``default`` ServiceAccount every Pod
needs, publishes the root CA Pods mount, and lifts a new Node's not-ready taint). Pods run
on the node that ``node.py`` adds (kubelet, containerd, runc, kube-scheduler).

The binaries come from ``scripts/build-controlplane.sh`` (built from the Go module proxy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from devstack import processes

ROOT = Path(__file__).resolve().parent.parent
ADMIN_USER = "celery-reconciler-admin"
CRD_DIR = ROOT / "charts" / "celery-reconciler" / "files" / "crds"
PEERING_CRDS = ROOT / "charts" / "celery-reconciler" / "crds" / "kopf-peerings.yaml"


def bin_dir() -> Path:
    """The cached control-plane binaries; builds them when missing (minutes, once)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-controlplane.sh")],
        check=False,
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise processes.ComponentMissing(
            "could not build the control-plane binaries (scripts/build-controlplane.sh); "
            "run `make setup` and read its output"
        )
    return Path(result.stdout.strip().splitlines()[-1])


@dataclasses.dataclass
class ControlPlane:
    workdir: Path
    bin_dir: Path
    server: str
    admin_token: str
    kubeconfig: Path
    ca_file: Path
    etcd: processes.ManagedProcess
    apiserver: processes.ManagedProcess
    controller_manager: processes.ManagedProcess | None

    def env(self, *, kubeconfig: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return _run(
            [str(self.bin_dir / "kubectl"), *args],
            env=self.env(kubeconfig=kubeconfig),
            check=check,
            input=input,
        )

    def helm(
        self, *args: str, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        helm_home = self.workdir / "helm"
        env = self.env(kubeconfig=kubeconfig)
        env.update(
            HELM_CACHE_HOME=str(helm_home / "cache"),
            HELM_CONFIG_HOME=str(helm_home / "config"),
            HELM_DATA_HOME=str(helm_home / "data"),
        )
        return _run([str(self.bin_dir / "helm"), *args], env=env, check=check, input=None)

    def write_kubeconfig(
        self, path: Path, *, token: str, namespace: str = "default", server: str | None = None
    ) -> Path:
        """A kubeconfig for a bearer token, e.g. from ``kubectl create token``; ``server``
        reaches the apiserver another way (a proxy a test can cut) under the same CA."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "devstack",
                            "cluster": {
                                "server": server or self.server,
                                "certificate-authority": str(self.ca_file),
                            },
                        }
                    ],
                    "users": [{"name": "user", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "devstack",
                            "context": {
                                "cluster": "devstack",
                                "user": "user",
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "devstack",
                }
            )
        )
        path.chmod(0o600)
        return path

    def service_account_kubeconfig(
        self, *, namespace: str, service_account: str, path: Path
    ) -> Path:
        token = self.kubectl(
            "-n", namespace, "create", "token", service_account, "--duration=2h"
        ).stdout.strip()
        return self.write_kubeconfig(path, token=token, namespace=namespace)

    def restart_apiserver(self) -> None:
        """SIGKILL kube-apiserver (a crash, no graceful drain) and start it again on the
        same port, certificates and etcd; returns once it answers /readyz. Every watch and
        connection to it breaks, as in a control-plane outage."""
        self.apiserver.kill()
        self.apiserver.start()
        self.apiserver.wait_until(
            lambda: _readyz(self.server, self.admin_token, self.ca_file),
            timeout_seconds=90,
            what="ready (/readyz) after a restart",
        )

    def install_crds(self) -> None:
        """Our CRDs and kopf's peering CRDs, as the chart installs them, once Established:
        what every operator run against this control plane needs first."""
        self.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
        self.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
        self.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/processingpolicies.celery-reconciler.io",
            "crd/processingstatuses.celery-reconciler.io",
        )

    def stop(self) -> None:
        # Reverse order: an apiserver whose etcd vanished takes ~25 s to exit.
        if self.controller_manager is not None:
            self.controller_manager.stop(timeout_seconds=5)
        self.apiserver.stop(timeout_seconds=10)
        self.etcd.stop(timeout_seconds=5)


def _run(
    argv: Sequence[str], *, env: dict[str, str], check: bool, input: str | None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), env=env, input=input, capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, argv, output=result.stdout, stderr=result.stderr
        )
    return result


def _readyz(server: str, token: str, ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file))
    request = urllib.request.Request(
        f"{server}/readyz", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, context=context, timeout=2) as response:
        return bool(response.status == 200)


def start(workdir: Path, *, controller_manager: bool = True) -> ControlPlane:
    """Start etcd, kube-apiserver (and kube-controller-manager); if any of them fails, stop
    those already running, so a failed start-up leaves no server behind."""
    started: list[processes.ManagedProcess] = []
    try:
        return _start(workdir, controller_manager=controller_manager, started=started)
    except BaseException:
        for process in reversed(started):
            process.stop(timeout_seconds=5)
        raise


def _start(
    workdir: Path, *, controller_manager: bool, started: list[processes.ManagedProcess]
) -> ControlPlane:
    binaries = bin_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    certs.mkdir(exist_ok=True)
    sa_key = certs / "sa.key"
    sa_pub = certs / "sa.pub"
    if not sa_key.exists():
        subprocess.run(
            ["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
            check=True,
            capture_output=True,
        )
    admin_token = os.urandom(16).hex()
    token_file = certs / "tokens.csv"
    token_file.write_text(f'{admin_token},{ADMIN_USER},1000,"system:masters"\n')
    token_file.chmod(0o600)

    etcd_port, etcd_peer_port, api_port = (processes.free_port() for _ in range(3))
    etcd = processes.ManagedProcess(
        name="etcd",
        argv=[
            str(binaries / "etcd"),
            "--data-dir",
            str(workdir / "etcd-data"),
            "--listen-client-urls",
            f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{etcd_peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{etcd_peer_port}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{etcd_peer_port}",
            "--log-level",
            "warn",
            "--unsafe-no-fsync",
        ],
        log_path=workdir / "etcd.log",
    )
    etcd.start()
    started.append(etcd)
    etcd.wait_until(lambda: processes.port_accepts(etcd_port), timeout_seconds=30, what="listening")

    server = f"https://127.0.0.1:{api_port}"
    ca_file = certs / "apiserver.crt"
    apiserver = processes.ManagedProcess(
        name="kube-apiserver",
        argv=[
            str(binaries / "kube-apiserver"),
            "--etcd-servers",
            f"http://127.0.0.1:{etcd_port}",
            "--cert-dir",
            str(certs),
            "--secure-port",
            str(api_port),
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            # v1.37 refuses a loopback advertise address with the default reconciler.
            "--endpoint-reconciler-type",
            "none",
            "--service-cluster-ip-range",
            "10.0.0.0/24",
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            str(sa_pub),
            "--service-account-signing-key-file",
            str(sa_key),
            "--authorization-mode",
            "Node,RBAC",
            "--token-auth-file",
            str(token_file),
            "--enable-priority-and-fairness=false",
            "--profiling=false",
        ],
        log_path=workdir / "kube-apiserver.log",
    )
    apiserver.start()
    started.append(apiserver)
    apiserver.wait_until(
        lambda: ca_file.exists() and _readyz(server, admin_token, ca_file),
        timeout_seconds=90,
        what="ready (/readyz)",
    )
    plane = ControlPlane(
        workdir=workdir,
        bin_dir=binaries,
        server=server,
        admin_token=admin_token,
        kubeconfig=workdir / "admin.kubeconfig",
        ca_file=ca_file,
        etcd=etcd,
        apiserver=apiserver,
        controller_manager=None,
    )
    plane.write_kubeconfig(plane.kubeconfig, token=admin_token)
    if controller_manager:
        plane.controller_manager = processes.ManagedProcess(
            name="kube-controller-manager",
            argv=[
                str(binaries / "kube-controller-manager"),
                "--kubeconfig",
                str(plane.kubeconfig),
                "--leader-elect=false",
                "--service-account-private-key-file",
                str(sa_key),
                "--root-ca-file",
                str(ca_file),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "0",
                "--controllers",
                "*,-nodeipam,-kube-apiserver-serving-clustertrustbundle-publisher-controller",
                "--concurrent-gc-syncs",
                "5",
            ],
            log_path=workdir / "kube-controller-manager.log",
        )
        plane.controller_manager.start()
        started.append(plane.controller_manager)
        plane.controller_manager.wait_until(
            lambda: (
                "default"
                in plane.kubectl("get", "sa", "-n", "default", "-o", "name", check=False).stdout
            ),
            timeout_seconds=60,
            what="creating the default ServiceAccount",
        )
    return plane
