"""``make demo``: the whole promise on a local stack, in about a minute.

It brings up real servers (etcd, kube-apiserver, kube-controller-manager, PostgreSQL, Redis),
installs the chart with ``helm install`` (CRDs, ServiceAccount, least-privilege RBAC), runs
the operator with the chart's own arguments and a token of the chart's ServiceAccount, starts
two demo ``celery worker`` processes registered as Pods, seeds journal entries and applies a
ProcessingPolicy. While ``kubectl get processingstatus`` refreshes on screen, it SIGKILLs one
worker mid-run and marks its Pod restarted, as a kubelet would, then restarts the worker.
The summary is read from the database: every entry processed, none lost, none run twice.

Ctrl-C, or the end, stops every process it started.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from celery_app.demo import audit, schema
from celery_reconciler import policy
from devstack import kube, postgres, processes, redis, workers

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "celery-reconciler"
NAMESPACE = "mindjourney"
OPERATOR_NAMESPACE = "celery-reconciler"
POLICY = "journal-insights"
WORKER_LABELS = {"app": "insights-worker"}


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


class Demo:
    def __init__(self, *, workdir: Path, entries: int, task_seconds: float) -> None:
        self.workdir = workdir
        self.entries = entries
        self.task_seconds = task_seconds
        self.stoppables: list[Any] = []
        self.plane: kube.ControlPlane | None = None
        self.dsn = ""
        self.broker_url = ""
        self.worker_processes: dict[str, processes.ManagedProcess] = {}
        self.pods: dict[str, workers.PodIdentity] = {}

    # -- set-up -------------------------------------------------------------------------

    def start_stack(self) -> None:
        say("starting PostgreSQL, Redis, etcd, kube-apiserver and kube-controller-manager")
        database = postgres.start(self.workdir / "postgres")
        self.stoppables.append(database.remove)
        broker = redis.start(self.workdir / "redis")
        self.stoppables.append(broker.stop)
        self.plane = kube.start(self.workdir / "kube")
        self.stoppables.append(self.plane.stop)
        self.dsn = database.create_database("mindjourney")
        self.broker_url = broker.url

    def install_chart(self) -> Path:
        plane = self.require_plane()
        say(
            f"helm install celery-reconciler (namespace {OPERATOR_NAMESPACE}, watching {NAMESPACE})"
        )
        plane.kubectl("create", "namespace", NAMESPACE)
        plane.helm(
            "install",
            "celery-reconciler",
            str(CHART),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--set",
            f"watch.namespaces={{{NAMESPACE}}}",
        )
        return plane.service_account_kubeconfig(
            namespace=OPERATOR_NAMESPACE,
            service_account="celery-reconciler",
            path=self.workdir / "operator.kubeconfig",
        )

    def chart_operator_args(self) -> list[str]:
        """The arguments the chart's Deployment gives the operator container."""
        plane = self.require_plane()
        deployment = json.loads(
            plane.kubectl(
                "-n", OPERATOR_NAMESPACE, "get", "deployment", "celery-reconciler", "-o", "json"
            ).stdout
        )
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return [str(arg) for arg in container.get("args", [])]

    def start_operator(self, kubeconfig: Path) -> int:
        plane = self.require_plane()
        liveness, metrics = processes.free_port(), processes.free_port()
        args = self.chart_operator_args()
        # Same command as in the pod; only the listening addresses move to loopback ports.
        for flag, value in (
            ("--liveness", f"http://127.0.0.1:{liveness}/healthz"),
            ("--metrics-port", str(metrics)),
        ):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        say("starting the operator with the chart's arguments and its ServiceAccount's token")
        operator = processes.ManagedProcess(
            name="operator",
            argv=[sys.executable, "-m", "celery_reconciler", *args],
            log_path=self.workdir / "operator.log",
            env=plane.env(kubeconfig=kubeconfig),
        )
        operator.start()
        self.stoppables.append(operator.stop)
        operator.wait_until(
            lambda: _http_ok(f"http://127.0.0.1:{liveness}/healthz"),
            timeout_seconds=60,
            what="healthy",
        )
        return metrics

    def start_worker(self, pod: workers.PodIdentity) -> processes.ManagedProcess:
        pod_name = pod.name
        worker = workers.start_worker(
            pod_name=pod_name,
            pod=pod,
            broker_url=self.broker_url,
            dsn=self.dsn,
            log_dir=self.workdir,
            concurrency=2,
        )
        self.worker_processes[pod_name] = worker
        return worker

    def seed(self) -> None:
        say(f"seeding {self.entries} journal entries (each body takes {self.task_seconds}s)")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            schema.create_schema(conn)
            schema.seed(conn, count=self.entries)
            conn.execute(
                "INSERT INTO demo_faults (entry_id, kind, seconds) "
                "SELECT id, 'sleep', %s FROM journal_entry",
                [self.task_seconds],
            )

    def apply_policy(self) -> None:
        plane = self.require_plane()
        spec = schema.policy_spec(sweep_interval="30s", lease_timeout="5m")
        spec["workers"] = {"podSelector": {"matchLabels": WORKER_LABELS}}
        manifests = [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "demo-db"},
                "stringData": {"dsn": self.dsn},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "demo-broker"},
                "stringData": {"url": self.broker_url},
            },
            {
                "apiVersion": "celery-reconciler.io/v1alpha1",
                "kind": "ProcessingPolicy",
                "metadata": {"name": POLICY},
                "spec": spec,
            },
        ]
        say(f"kubectl apply a ProcessingPolicy ({POLICY}) and its two Secrets")
        plane.kubectl(
            "-n",
            NAMESPACE,
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}),
        )

    # -- the run ------------------------------------------------------------------------

    def processed(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            return audit.tally(conn).processed

    def status_table(self) -> str:
        plane = self.require_plane()
        return plane.kubectl("-n", NAMESPACE, "get", "processingstatus", check=False).stdout

    def show(self, note: str = "") -> None:
        table = self.status_table().rstrip()
        stamp = time.strftime("%H:%M:%S")
        print(
            f"\n[{stamp}] $ kubectl get processingstatus -n {NAMESPACE}{note}\n{table}", flush=True
        )

    def kill_a_worker_mid_run(self, pod_name: str) -> Any:
        say(f"SIGKILL worker {pod_name} mid-run (its bodies die with it)")
        self.worker_processes[pod_name].kill()
        with psycopg.connect(self.dsn) as conn:
            killed_at = audit.database_now(conn)
        say(f"marking Pod {pod_name} restarted (restartCount 1), as the kubelet would")
        workers.report_running(
            self.require_plane(), namespace=NAMESPACE, name=pod_name, restart_count=1
        )
        self.start_worker(self.pods[pod_name])
        return killed_at

    def run(self) -> int:
        self.start_stack()
        operator_kubeconfig = self.install_chart()
        for pod_name in ("insights-worker-0", "insights-worker-1"):
            self.pods[pod_name] = workers.register_pod(
                self.require_plane(), namespace=NAMESPACE, name=pod_name, labels=WORKER_LABELS
            )
            self.start_worker(self.pods[pod_name])
        say("two celery workers are up, registered as Pods insights-worker-0 and -1")
        self.seed()
        metrics_port = self.start_operator(operator_kubeconfig)
        self.apply_policy()

        started = time.monotonic()
        killed_at: Any = None
        while True:
            done = self.processed()
            self.show(f"   ({done}/{self.entries} processed in the database)")
            if killed_at is None and done >= self.entries // 3:
                killed_at = self.kill_a_worker_mid_run("insights-worker-0")
            if done >= self.entries:
                break
            if time.monotonic() - started > 600:
                say("not finished after 10 minutes; see the logs")
                return 1
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        time.sleep(1.5)  # let the operator's next status write land
        self.show("   (final)")
        return self.summarize(elapsed=elapsed, killed_at=killed_at, metrics_port=metrics_port)

    def summarize(self, *, elapsed: float, killed_at: Any, metrics_port: int) -> int:
        with psycopg.connect(self.dsn) as conn:
            tally = audit.tally(conn)
            all_runs = audit.runs(conn)
            overlaps = audit.overlapping_runs(all_runs, killed_at={"insights-worker-0": killed_at})
        plane = self.require_plane()
        status = json.loads(
            plane.kubectl("-n", NAMESPACE, "get", "processingstatus", POLICY, "-o", "json").stdout
        )["status"]
        rescue = status.get("lastRescue") or {}
        lost = tally.entries - tally.processed
        duplicates = tally.duplicate_successes + len(overlaps)
        cut_short = [run for run in all_runs if run.finished_at is None]
        # How often each cut-short entry's body ran again afterwards, counted from task_runs.
        reruns = collections.Counter(
            sum(
                1
                for run in all_runs
                if run.entry_id == cut.entry_id and run.started_at > cut.started_at
            )
            for cut in cut_short
        )
        lease_seconds = self.require_policy_lease_seconds()
        print()
        say("summary (read from PostgreSQL, not from the operator)")
        print(f"    entries:              {tally.entries}")
        print(f"    processed:            {tally.processed}")
        print(f"    lost:                 {lost}")
        print(
            f"    body runs:            {tally.runs} ({len(cut_short)} cut short by the kill; "
            + ", ".join(
                f"{entries} re-ran {times} time{'s' if times != 1 else ''}"
                for times, entries in sorted(reruns.items())
            )
            + ")"
        )
        print(
            f"    duplicate runs:       {duplicates} (same entry succeeding twice, or two "
            "runs at once)"
        )
        print(
            f"    rescued:              {rescue.get('count', 0)} entries held by "
            f"{rescue.get('pod', '-')}, re-dispatched "
            f"{rescue.get('secondsToRedispatch', '?')}s after its Pod restarted "
            f"(lease: {lease_seconds:.0f}s)"
        )
        print(f"    wall time:            {elapsed:.1f}s for {self.entries} entries")
        print(f"    metrics:              http://127.0.0.1:{metrics_port}/metrics (until exit)")
        print(f"    logs:                 {self.workdir}")
        print()
        ok = lost == 0 and duplicates == 0
        verdict = f"all {tally.entries} entries processed, {lost} lost, {duplicates} duplicate runs"
        say(verdict if ok else f"FAILED: {verdict}")
        return 0 if ok else 1

    def require_policy_lease_seconds(self) -> float:
        """The lease of the policy as the API server holds it (what the operator uses)."""
        spec = json.loads(
            self.require_plane()
            .kubectl("-n", NAMESPACE, "get", "processingpolicy", POLICY, "-o", "json")
            .stdout
        )["spec"]
        return policy.parse_duration_seconds(spec["lease"]["timeout"])

    def require_plane(self) -> kube.ControlPlane:
        assert self.plane is not None
        return self.plane

    def stop(self) -> None:
        for worker in self.worker_processes.values():
            worker.stop()
        for stop in reversed(self.stoppables):
            with contextlib.suppress(Exception):
                stop()


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so every exit path runs the clean-up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500, help="journal entries to seed")
    parser.add_argument(
        "--task-seconds", type=float, default=0.15, help="how long each task body takes"
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="celery-reconciler-demo-"))
    demo = Demo(workdir=workdir, entries=args.entries, task_seconds=args.task_seconds)
    code = 1
    try:
        with interrupts_raise():
            code = demo.run()
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    except (
        processes.StartupFailed,
        processes.ComponentMissing,
        subprocess.CalledProcessError,
    ) as error:
        detail = getattr(error, "stderr", "") or ""
        say(f"demo failed: {error} {detail}".strip())
    finally:
        say("stopping every process the demo started")
        demo.stop()
        # Keep the logs the summary points at; drop the bulky etcd data.
        shutil.rmtree(workdir / "kube" / "etcd-data", ignore_errors=True)
    return code
