"""A real Kubernetes node for the local stack: containerd, runc, kubelet and kube-scheduler.

Pods scheduled here really run: the kubelet starts our image through containerd's CRI and
runc, restarts a container whose process dies, reports status and restart counts — the
events the operator's pod-restart rescue exists for, which a hand-patched ``pods/status``
can only imitate. Several stacks share one machine, so every stack's node has its own
name, state directories, containerd socket, loopback ports and cgroup root, and is torn
down by PID and by path, never by a process name.

What this node deliberately lacks, and why:

* **No CNI, no kube-proxy.** Network traffic must stay on loopback, so Pods run with
  ``hostNetwork: true``. containerd reports ``NetworkReady`` only when a CNI config exists;
  a conflist naming a plugin that is not installed satisfies it, and hostNetwork Pods never
  call CNI. Without kube-proxy the ``kubernetes`` Service VIP is unreachable, so in-cluster
  clients are pointed at the apiserver's loopback port (``KUBERNETES_SERVICE_HOST``/``PORT``).
* **No node address.** The kubelet refuses a loopback node IP as an address, so the Node has
  none and ``kubectl logs`` cannot reach it; container logs are read from the kubelet's
  ``podLogsDir`` instead (``Node.container_log``).
* **The admin's kubeconfig for the kubelet**, not a TLS-bootstrapped node identity: the
  node authorizer is not what this test bed exercises.

containerd is built by ``scripts/build-node.sh``, kubelet and kube-scheduler by
``scripts/build-controlplane.sh`` (same Kubernetes version as the apiserver), the image by
``scripts/build-image.sh``; runc comes from Debian.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devstack import kube, processes

ROOT = Path(__file__).resolve().parent.parent
CGROUP_FS = Path("/sys/fs/cgroup")
RUNC = "/usr/sbin/runc"


@dataclasses.dataclass(frozen=True)
class Image:
    """The project's image, built from the Dockerfile, as containerd knows it."""

    ref: str
    archive: Path


def _script_output(script: str, what: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / script)],
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise processes.ComponentMissing(
            f"could not build {what} (scripts/{script}); run `make setup` and read its "
            f"output:\n{result.stderr[-2000:]}"
        )
    return result.stdout.strip().splitlines()


def node_dir() -> Path:
    """The cached containerd binaries and pause image; built when missing (minutes, once)."""
    return Path(_script_output("build-node.sh", "containerd and the pause image")[-1])


# An OCI archive that scripts/build-image.sh made of this checkout's image, used as it is:
# the build takes a lock shared by every checkout on the machine (and keeps only the three
# newest archives), so a run that must not wait behind other checkouts' builds may name a
# copy of its own. Nothing checks that it matches the sources: the one who sets it does.
PREBUILT_IMAGE_VARIABLE = "CELERY_RECONCILER_IMAGE_ARCHIVE"


def project_image() -> Image:
    """The project's image, rebuilt when the Dockerfile or its context changed (or the
    archive ``$CELERY_RECONCILER_IMAGE_ARCHIVE`` names, with the reference it carries)."""
    prebuilt = os.environ.get(PREBUILT_IMAGE_VARIABLE)
    if prebuilt:
        with tarfile.open(prebuilt) as tar:
            index = tar.extractfile("index.json")
            if index is None:
                raise processes.ComponentMissing(f"{prebuilt} is not an OCI archive")
            manifest = json.load(index)["manifests"][0]
        ref = manifest["annotations"]["org.opencontainers.image.ref.name"]
        return Image(ref=str(ref), archive=Path(prebuilt))
    ref, archive = _script_output("build-image.sh", "the project's image")[-2:]
    return Image(ref=ref, archive=Path(archive))


@dataclasses.dataclass
class Node:
    name: str
    workdir: Path
    plane: kube.ControlPlane
    socket: Path
    cgroup_root: str
    pod_logs: Path
    image: Image
    ctr_binary: Path
    containerd: processes.ManagedProcess
    kubelet: processes.ManagedProcess | None = None
    scheduler: processes.ManagedProcess | None = None

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # ctr v2 needs an absolute socket path.
        result = subprocess.run(
            [str(self.ctr_binary), "-a", str(self.socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, output=result.stdout, stderr=result.stderr
            )
        return result

    def container_pid(self, container_id: str) -> int:
        """The host PID of a container's main process (``containerID`` without its scheme)."""
        task = self.ctr("tasks", "ls").stdout
        for line in task.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id.removeprefix("containerd://"):
                return int(fields[1])
        raise LookupError(f"no running task {container_id} in containerd:\n{task}")

    def container_status(self, *, namespace: str, pod: str, container: str) -> dict[str, Any]:
        """The kubelet's report on one container of a Pod (empty before it has one)."""
        got = self.plane.kubectl("-n", namespace, "get", "pod", pod, "-o", "json")
        statuses = json.loads(got.stdout).get("status", {}).get("containerStatuses") or []
        for status in statuses:
            if status["name"] == container:
                return dict(status)
        return {}

    def main_pid(self, *, namespace: str, pod: str, container: str) -> int:
        """The host PID of a running container's main process."""
        status = self.container_status(namespace=namespace, pod=pod, container=container)
        return self.container_pid(status["containerID"])

    def kill_container(self, *, namespace: str, pod: str, container: str) -> int:
        """SIGKILL a container's main process, as a crash or an OOM kill would; the kubelet
        restarts it (restartCount + 1) or, for a Never policy, reports it failed."""
        pid = self.main_pid(namespace=namespace, pod=pod, container=container)
        os.kill(pid, signal.SIGKILL)
        return pid

    def container_log(self, *, namespace: str, pod: str, container: str) -> str:
        """All of a container's log files, oldest restart first (``kubectl logs`` has no
        address to reach this node, see the module docstring)."""
        texts = []
        for pod_dir in sorted(self.pod_logs.glob(f"{namespace}_{pod}_*")):
            files = (pod_dir / container).glob("*.log")
            for log in sorted(files, key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
                texts.append(log.read_text(errors="replace"))
        return "".join(texts)

    def container_instance_log(
        self, *, namespace: str, pod: str, container: str, restart: int
    ) -> str:
        """The log of one instance of a container: the ``restart``-th restart's own file
        (``<restart>.log``). The kubelet keeps only the two newest files of a container, so
        from its second restart on, ``container_log`` no longer holds every instance."""
        texts = [
            path.read_text(errors="replace")
            for pod_dir in sorted(self.pod_logs.glob(f"{namespace}_{pod}_*"))
            for path in (pod_dir / container).glob(f"{restart}.log")
        ]
        return "".join(texts)

    def pod_env(self) -> dict[str, str]:
        """Env overrides an in-cluster client needs on this node: no kube-proxy means the
        ``kubernetes`` Service's VIP leads nowhere, the apiserver's loopback port does."""
        host, port = self.plane.server.removeprefix("https://").rsplit(":", 1)
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}

    def stop(self) -> None:
        try:
            for process in (self.scheduler, self.kubelet):
                if process is not None:
                    process.stop(timeout_seconds=10)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        teardown(
            workdir=self.workdir,
            socket=self.socket,
            cgroup_root=self.cgroup_root,
            ctr_binary=self.ctr_binary,
            # Our own child: stop() reaps it (a zombie would look alive to a PID probe).
            stop_containerd=lambda: self.containerd.stop(timeout_seconds=10),
        )

    def record(self) -> dict[str, object]:
        """What ``make stack-down`` needs to tear this node down from another process."""
        return {
            "workdir": str(self.workdir),
            "socket": str(self.socket),
            "cgroup_root": self.cgroup_root,
            "ctr_binary": str(self.ctr_binary),
            "containerd_pid": self.containerd.pid,
            "pids": [p.pid for p in (self.scheduler, self.kubelet) if p and p.pid],
        }


def chart_flags(
    node: Node,
    *,
    watch_namespace: str,
    workers: int,
    concurrency: int = 2,
    health_port: int,
    metrics_port: int,
    broker_secret: tuple[str, str],
    database_secret: tuple[str, str],
) -> list[str]:
    """``helm install`` flags that run the chart's operator and demo workers on this node.

    Each departs from the chart's defaults for a reason of the test bed, not of production:
    no pod network (``hostNetwork``, so ports must be free on the machine), no kube-proxy
    (the apiserver's address for in-cluster clients; the ``helm test`` Pod fetches metrics
    from loopback, not through the Service), no registry (the imported image, never pulled).
    """
    repository, tag = node.image.ref.rsplit(":", 1)
    env = [{"name": key, "value": value} for key, value in node.pod_env().items()]
    return [
        "--set", f"image.repository={repository}",
        "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        "--set", "hostNetwork=true",
        "--set", f"health.port={health_port}",
        "--set", f"metrics.port={metrics_port}",
        "--set", f"tests.metricsUrl=http://127.0.0.1:{metrics_port}/metrics",
        "--set-json", f"operator.env={json.dumps(env)}",
        "--set-json", f"watch.namespaces={json.dumps([watch_namespace])}",
        "--set", "demoWorker.enabled=true",
        "--set", f"demoWorker.replicaCount={workers}",
        "--set", f"demoWorker.concurrency={concurrency}",
        "--set", f"demoWorker.brokerSecretRef.name={broker_secret[0]}",
        "--set", f"demoWorker.brokerSecretRef.key={broker_secret[1]}",
        "--set", f"demoWorker.databaseSecretRef.name={database_secret[0]}",
        "--set", f"demoWorker.databaseSecretRef.key={database_secret[1]}",
    ]  # fmt: skip


def stop_recorded(record: dict[str, object]) -> None:
    """Tear down a node that ``start`` recorded with ``Node.record`` (``make stack-down``)."""
    for pid in record["pids"]:  # type: ignore[attr-defined]
        processes.stop_pid(int(pid))
    containerd_pid = int(str(record["containerd_pid"]))
    teardown(
        workdir=Path(str(record["workdir"])),
        socket=Path(str(record["socket"])),
        cgroup_root=str(record["cgroup_root"]),
        ctr_binary=Path(str(record["ctr_binary"])),
        stop_containerd=lambda: processes.stop_pid(containerd_pid),
    )


def _cgroup_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies (cpu, memory, pids, name=systemd, ...) the kubelet uses."""
    return [
        path
        for path in sorted(CGROUP_FS.iterdir())
        if path.is_dir() and not path.is_symlink() and path.name != "unified"
    ]


def _processes_in_cgroup(cgroup_root: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _cgroup_hierarchies():
        tree = hierarchy / cgroup_root.lstrip("/")
        if tree.is_dir():
            for procs in tree.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(pid) for pid in procs.read_text().split())
    return pids


def _shim_pids(socket: Path) -> set[int]:
    """Our containerd's shims: each names its containerd's socket on its command line, so
    another stack's shims (or the host's) never match."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in argv:
                found.add(int(proc.name))
    return found


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _unmount_under(workdir: Path) -> None:
    """The kubelet bind-mounts its root dir onto itself, containerd mounts overlay rootfs
    and shm: unmount everything under the node's directory, deepest first."""
    prefix = str(workdir.resolve())
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def teardown(
    *,
    workdir: Path,
    socket: Path,
    cgroup_root: str,
    ctr_binary: Path,
    stop_containerd: Callable[[], None],
) -> None:
    """Everything the node started, stopped by PID and by path: containers (whatever is in
    our cgroup root), shims (by our socket), containerd, then mounts and cgroups. Each later
    step runs even if an earlier one failed: a containerd left running would outlive its
    caller, and a mount or cgroup left behind would outlive the machine's next stacks."""
    try:
        for _ in range(50):
            remaining = _processes_in_cgroup(cgroup_root)
            if not remaining:
                break
            _kill_all(remaining)
            time.sleep(0.1)
        _remove_tasks(ctr_binary=ctr_binary, socket=socket)
        # Killed and seen gone, not only signalled: on a loaded machine a killed shim was
        # still listed when the demo's caller looked right after.
        for _ in range(50):
            shims = _shim_pids(socket)
            if not shims:
                break
            _kill_all(shims)
            time.sleep(0.1)
    finally:
        try:
            stop_containerd()
        finally:
            _unmount_under(workdir)
            _remove_cgroups(cgroup_root)


def _remove_tasks(*, ctr_binary: Path, socket: Path) -> None:
    """Ask our containerd to forget its (dead) tasks, so their shims exit; best effort,
    since the shims are killed by PID next anyway."""
    if not socket.exists():
        return
    ctr = [str(ctr_binary), "-a", str(socket), "-n", "k8s.io"]
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        listed = subprocess.run(
            [*ctr, "tasks", "ls", "-q"], capture_output=True, text=True, timeout=10, check=False
        )
        for task in listed.stdout.split():
            subprocess.run(
                [*ctr, "tasks", "rm", "-f", task], capture_output=True, timeout=10, check=False
            )


def _remove_cgroups(cgroup_root: str) -> None:
    for hierarchy in _cgroup_hierarchies():
        tree = hierarchy / cgroup_root.lstrip("/")
        if tree.is_dir():
            for directory in sorted(
                (p for p in tree.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                tree.rmdir()


def start(plane: kube.ControlPlane, workdir: Path) -> Node:
    """containerd, the images, kubelet and kube-scheduler; a failed start stops what started."""
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"node-{uuid.uuid4().hex[:8]}"
    socket = workdir / "containerd" / "containerd.sock"
    cgroup_root = f"/celery-reconciler-{name}"
    node_bin = node_dir()
    image = project_image()
    containerd = _start_containerd(workdir=workdir, node_bin=node_bin, socket=socket)
    node = Node(
        name=name,
        workdir=workdir,
        plane=plane,
        socket=socket,
        cgroup_root=cgroup_root,
        pod_logs=workdir / "kubelet" / "pod-logs",
        image=image,
        ctr_binary=node_bin / "bin" / "ctr",
        containerd=containerd,
    )
    try:
        node.ctr("images", "import", str(node_bin / "images" / "pause-3.10-local.tar"))
        node.ctr("images", "import", str(image.archive))
        # The kubelet's image GC may delete unused images under disk pressure; nothing can
        # pull this one back, so pin it.
        node.ctr("images", "label", image.ref, "io.cri-containerd.pinned=pinned")
        node.kubelet = _start_kubelet(node)
        node.scheduler = _start_scheduler(plane, workdir)
        _wait_until_schedulable(node)
    except BaseException:
        node.stop()
        raise
    return node


def _start_containerd(*, workdir: Path, node_bin: Path, socket: Path) -> processes.ManagedProcess:
    state = workdir / "containerd"
    cni_conf, cni_bin = state / "cni-conf", state / "cni-bin"
    for directory in (cni_conf, cni_bin):
        directory.mkdir(parents=True, exist_ok=True)
    # A conflist naming a plugin that is not installed (cni-bin stays empty): NetworkReady
    # becomes true, and hostNetwork Pods never run a plugin.
    (cni_conf / "10-hostonly.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "hostonly", "plugins": [{"type": "loopback"}]})
    )
    _mount_memory(state / "root")
    config = state / "config.toml"
    config.write_text(
        _CONTAINERD_CONFIG.format(
            root=json.dumps(str(state / "root")),
            state=json.dumps(str(state / "state")),
            socket=json.dumps(str(socket)),
            ttrpc=json.dumps(f"{socket}.ttrpc"),
            runc=json.dumps(RUNC),
            runc_root=json.dumps(str(state / "runc")),
            cni_bin=json.dumps(str(cni_bin)),
            cni_conf=json.dumps(str(cni_conf)),
        )
    )
    if not Path(RUNC).exists():
        raise processes.ComponentMissing(f"{RUNC} is missing; run `make setup` (Debian's runc)")
    env = dict(os.environ)
    # containerd finds its shim on PATH.
    env["PATH"] = f"{node_bin / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    containerd = processes.ManagedProcess(
        name=f"containerd:{workdir.name}",
        argv=[str(node_bin / "bin" / "containerd"), "--config", str(config)],
        log_path=workdir / "containerd.log",
        env=env,
    )
    try:
        containerd.start()
        containerd.wait_until(socket.exists, timeout_seconds=60, what="serving its socket")
    except BaseException:
        containerd.stop()
        _unmount_under(workdir)
        raise
    return containerd


def _mount_memory(directory: Path) -> None:
    """A tmpfs for containerd's image store and snapshots. On this machine kind's disk
    (ext4 mounted with ``discard``) deleting the ~500 MB the unpacked image takes was most of
    a node's teardown, spent waiting on I/O; in memory ``teardown``'s unmount frees it at
    once. The size is a cap, not a reservation."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8g,mode=0700", "tmpfs", str(directory)],
        check=True,
        capture_output=True,
    )


# containerd 2.x reads config version 3 (and migrates it in memory). NRI is off because
# its socket path is machine-wide and a second stack's containerd would collide on it; runc
# keeps its state under the stack's directory rather than the machine's /run/containerd.
_CONTAINERD_CONFIG = """\
version = 3
root = {root}
state = {state}
[grpc]
  address = {socket}
[ttrpc]
  address = {ttrpc}
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.k8s.io/pause:3.10"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = {runc}
        Root = {runc_root}
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [{cni_bin}]
    conf_dir = {cni_conf}
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def _start_kubelet(node: Node) -> processes.ManagedProcess:
    kubelet_dir = node.workdir / "kubelet"
    kubelet_dir.mkdir(parents=True, exist_ok=True)
    # The kubelet checks that its cgroup root exists in every hierarchy it manages.
    for hierarchy in _cgroup_hierarchies():
        (hierarchy / node.cgroup_root.lstrip("/")).mkdir(exist_ok=True)
    port, healthz_port = processes.free_port(), processes.free_port()
    config = kubelet_dir / "config.json"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "kubelet.config.k8s.io/v1beta1",
                "kind": "KubeletConfiguration",
                # 1.37 refuses cgroup v1 unless told otherwise; this machine kind has v1.
                "failCgroupV1": False,
                "cgroupDriver": "cgroupfs",
                "cgroupRoot": node.cgroup_root,
                "failSwapOn": False,
                "containerRuntimeEndpoint": f"unix://{node.socket}",
                "address": "127.0.0.1",
                "port": port,
                "readOnlyPort": 0,
                "healthzBindAddress": "127.0.0.1",
                "healthzPort": healthz_port,
                "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
                "authorization": {"mode": "AlwaysAllow"},
                "resolvConf": "/etc/resolv.conf",
                "protectKernelDefaults": False,
                "enforceNodeAllocatable": ["pods"],
                # A test machine's disk is often fuller than a node's defaults tolerate; the
                # image cannot be pulled back after an eviction GC, so evict only near full.
                "evictionHard": {
                    "memory.available": "100Mi",
                    "nodefs.available": "2%",
                    "imagefs.available": "2%",
                },
                "imageGCHighThresholdPercent": 99,
                "imageGCLowThresholdPercent": 98,
                "podLogsDir": str(node.pod_logs),
                "volumePluginDir": str(kubelet_dir / "volume-plugins"),
                "registerNode": True,
                "serializeImagePulls": False,
                # Status reaches the apiserver (and so the operator's pod watch) sooner.
                "nodeStatusUpdateFrequency": "2s",
                "syncFrequency": "10s",
                # A container killed again and again (tests/chaos kills worker containers
                # dozens of times) would otherwise wait out CrashLoopBackOff, up to 5 min,
                # and the test would measure the kubelet's back-off, not the operator.
                "crashLoopBackOff": {"maxContainerRestartPeriod": "1s"},
            }
        )
    )
    kubelet = processes.ManagedProcess(
        name=f"kubelet:{node.name}",
        argv=[
            str(node.plane.bin_dir / "kubelet"),
            "--config",
            str(config),
            "--kubeconfig",
            str(node.plane.kubeconfig),
            "--root-dir",
            str(kubelet_dir / "root"),
            "--cert-dir",
            str(kubelet_dir / "pki"),
            "--hostname-override",
            node.name,
            "--node-ip",
            "127.0.0.1",
            "-v=1",
        ],
        log_path=node.workdir / "kubelet.log",
    )
    kubelet.start()
    kubelet.wait_until(
        lambda: processes.port_accepts(healthz_port), timeout_seconds=60, what="serving /healthz"
    )
    return kubelet


def _start_scheduler(plane: kube.ControlPlane, workdir: Path) -> processes.ManagedProcess:
    scheduler = processes.ManagedProcess(
        name=f"kube-scheduler:{workdir.name}",
        argv=[
            str(plane.bin_dir / "kube-scheduler"),
            "--kubeconfig",
            str(plane.kubeconfig),
            "--leader-elect=false",
            "--bind-address",
            "127.0.0.1",
            # Nothing scrapes it; a port of its own would be one more to keep apart.
            "--secure-port",
            "0",
        ],
        log_path=workdir / "kube-scheduler.log",
    )
    scheduler.start()
    return scheduler


_NOT_READY_TAINT = re.compile(r"node\.kubernetes\.io/not-ready")


def _wait_until_schedulable(node: Node) -> None:
    """Ready, and the not-ready taint gone (the controller-manager's node lifecycle
    controller lifts it), so the scheduler will place Pods here."""

    def schedulable() -> bool:
        got = node.plane.kubectl("get", "node", node.name, "-o", "json", check=False)
        if got.returncode != 0:
            return False
        status = json.loads(got.stdout)
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in status.get("status", {}).get("conditions", [])
        )
        taints = json.dumps(status.get("spec", {}).get("taints", []))
        return ready and not _NOT_READY_TAINT.search(taints)

    assert node.kubelet is not None
    node.kubelet.wait_until(schedulable, timeout_seconds=120, what="a Ready, untainted Node")


def remove_state(workdir: Path) -> None:
    """Delete the node's images, containers and volumes once ``teardown`` unmounted them
    (hundreds of MB per stack); the logs stay for whoever reads them next."""
    for state in ("containerd/root", "containerd/state", "containerd/runc", "kubelet/root"):
        shutil.rmtree(workdir / state, ignore_errors=True)
