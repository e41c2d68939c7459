"""The chaos driver: a backlog processed while every component we depend on fails at random.

One driver serves ``tests/chaos`` (a small fixed-seed run inside ``make test``, on the
session's stack) and ``make chaos`` (``python -m devstack chaos``: 10,000 entries and 100
faults of every kind, on a stack of its own). It

1. seeds ``--entries`` rows in ``chaos_entry`` (each with a random body length) and applies
   a ProcessingPolicy for them to an operator running as a local process, whose kubeconfig
   points at a TCP proxy in front of kube-apiserver (so the driver can cut its watches);
2. runs real celery workers as Pods of the project's image on the devstack node
   (``devstack.chaos_app``: a body that records its own runs and effects);
3. injects faults from a seed it prints (``--seed`` repeats a schedule), one thread per
   kind, so faults of different kinds overlap as they would in a bad hour:

   ``worker_kill``        SIGKILL of a worker Pod's main process; the kubelet restarts the
                          container and reports it (the pod-restart rescue's trigger)
   ``operator_kill``      SIGKILL of the operator as soon as its sweep is seen busy in
                          PostgreSQL (a statement running or a claim transaction open),
                          started again at once, as the kubelet would
   ``redis_restart``      Redis stopped and started without persistence: the queue is gone
   ``postgres_restart``   PostgreSQL stopped (fast shutdown) and started: every session dies
   ``apiserver_restart``  kube-apiserver SIGKILLed and started again: every watch breaks
   ``pod_watch_cut``      the operator's connections to the apiserver (its pod watch among
                          them) stalled for a moment, then reset by the proxy

4. waits until every entry is processed (failing loudly if progress stops), and checks the
   invariants with its own SQL over the body's own tables — never our ledger: **0 lost**
   (every entry has its effect), **0 duplicate effects** (exactly one effect row per entry:
   ``fenced_transaction``'s exactly-once claim), **0 overlapping runs** (no two runs of an
   entry overlap in time, and no run started while another held the entry's advisory
   lock). It prints rescue latency percentiles (worker kill -> the killed bodies' entries
   starting again, from the run table and the kill times) and the count of each fault kind.

The seed fixes each kind's schedule (gaps, targets, stall lengths) and the body lengths;
how the threads interleave depends on timing, so a failing seed is a strong hint, not a
replay. Latency is printed, never asserted.

Why worker Pods rather than local processes: a kill is then what production sees — the
kubelet notices, restarts the container and reports ``restartCount`` through the apiserver,
the operator learns it through its pod watch — and the Downward API identity is the
kubelet's, not ours. The operator is a local process so that it can be killed and restarted
in a second and reached through a proxy (in-cluster it takes ~13 s to be Ready again).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

from devstack import chaos_app, kube, node, operators, postgres, processes, redis, tcp_proxy
from devstack import workers as devstack_workers

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "charts" / "celery-reconciler" / "files" / "crds"
PEERING_CRDS = ROOT / "charts" / "celery-reconciler" / "crds" / "kopf-peerings.yaml"
FAULT_KINDS = (
    "worker_kill",
    "operator_kill",
    "redis_restart",
    "postgres_restart",
    "apiserver_restart",
    "pod_watch_cut",
)
WORKER_LABELS = {"app": "chaos-worker"}
POLICY = "chaos"
# No entry processed for this long, with entries left, is a stuck run: fail and say so.
STUCK_SECONDS = 300.0
# How long a fault may wait for its target to come back (a Pod to run, the apiserver to
# answer) before the driver gives up loudly.
RECOVERY_SECONDS = 180.0


class ChaosFailure(AssertionError):
    """An invariant broke, or the system stopped making progress: the seed says how."""


@dataclasses.dataclass(frozen=True)
class Stack:
    """The servers a run uses: the pytest session's, or ones ``main`` started."""

    plane: kube.ControlPlane
    node: node.Node
    postgres: postgres.PostgresServer
    workdir: Path


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int
    entries: int
    faults_per_kind: int
    workers: int = 3
    concurrency: int = 2


@dataclasses.dataclass
class Figures:
    """What a run measured; ``violations`` is empty when every invariant held."""

    seed: int
    entries: int
    processed: int
    runs: int
    faults: dict[str, int]
    faults_while_pending: int
    mid_sweep_kills: int
    latencies: list[float]
    killed_runs: int
    untraced_runs: int
    fence_lost: int
    seconds: float
    violations: list[str]
    self_fenced: int
    container_restarts: int = 0

    def lines(self) -> list[str]:
        out = [
            f"chaos: seed {self.seed}: {self.entries:,} entries, {self.processed:,} processed, "
            f"{self.runs:,} body runs in {self.seconds:.0f} s",
            "  faults: "
            + ", ".join(f"{kind} {self.faults.get(kind, 0)}" for kind in FAULT_KINDS)
            + f" ({sum(self.faults.values())} in all, {self.faults_while_pending} while "
            f"entries were pending; {self.mid_sweep_kills} of the operator kills mid-sweep)",
            f"  runs killed mid-body by worker kills: {self.killed_runs}; runs that lost "
            f"their fence (rolled back): {self.fence_lost}; runs with no end, no kill and no "
            f"self-fence to date their end (counted as never ending): {self.untraced_runs}",
            f"  worker containers restarted by the kubelet: {self.container_restarts} (worker "
            f"kills: {self.faults.get('worker_kill', 0)}); worker processes that fenced "
            f"themselves: {self.self_fenced}",
        ]
        if self.latencies:
            values = self.latencies
            out.append(
                f"  rescue latency (worker kill -> killed body's entry running again), "
                f"n={len(values)}: p50 {percentile(values, 0.5):.2f} s, "
                f"p90 {percentile(values, 0.9):.2f} s, p99 {percentile(values, 0.99):.2f} s, "
                f"max {max(values):.2f} s, mean {statistics.fmean(values):.2f} s"
            )
        else:
            out.append("  rescue latency: no worker kill caught a body mid-run")
        out.append(
            "  invariants: "
            + ("0 lost, 0 duplicate effects, 0 overlapping runs" if not self.violations else "")
        )
        out += [f"  VIOLATED: {violation}" for violation in self.violations]
        return out


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def say(text: str) -> None:
    print(f"chaos: {text}", flush=True)


def new_seed() -> int:
    return random.SystemRandom().randrange(1, 2**31)


# -- the run ------------------------------------------------------------------------------


def run(stack: Stack, settings: Settings) -> Figures:
    """One chaos run on ``stack``; raises ``ChaosFailure`` after printing the figures if an
    invariant broke (or progress stopped)."""
    say(f"seed {settings.seed} (repeat with --seed {settings.seed})")
    chaos = _Run(stack, settings)
    try:
        figures = chaos.execute()
    finally:
        chaos.close()
    for line in figures.lines():
        print(line, flush=True)
    if figures.violations:
        raise ChaosFailure(
            f"seed {settings.seed}: " + "; ".join(figures.violations) + f" (logs: {stack.workdir})"
        )
    return figures


class _Run:
    def __init__(self, stack: Stack, settings: Settings) -> None:
        self.stack = stack
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.workdir = stack.workdir / f"chaos-{settings.seed}-{uuid.uuid4().hex[:6]}"
        self.workdir.mkdir(parents=True)
        self.namespace = f"chaos-{uuid.uuid4().hex[:8]}"
        self.dsn = ""
        self.broker: redis.RedisServer | None = None
        self.proxy: tcp_proxy.PausableProxy | None = None
        self.operator: operators.OperatorProcess | None = None
        self.operator_lock = threading.Lock()
        self.pods: list[devstack_workers.WorkerPod] = []
        self.kills: list[tuple[str, datetime.datetime]] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.faults_while_pending = 0
        self.mid_sweep_kills = 0
        self.fault_lock = threading.Lock()
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.logs = _WorkerLogs(
            node_=stack.node, namespace=self.namespace, directory=self.workdir / "worker-logs"
        )
        # Seconds the fault threads spread their faults over; bodies are sized to it.
        self.planned_seconds = max(60.0, settings.faults_per_kind * 5.0)

    # -- set-up ---------------------------------------------------------------------------

    def execute(self) -> Figures:
        started = time.monotonic()
        self.prepare_database()
        self.broker = redis.start(self.workdir)
        self.start_control_plane_side()
        self.start_workers()
        self.apply_policy()
        say(
            f"{self.settings.entries:,} entries, {self.settings.workers} worker Pods x "
            f"{self.settings.concurrency} processes; injecting {self.settings.faults_per_kind} "
            f"faults of each kind: {', '.join(FAULT_KINDS)}"
        )
        threads = [
            threading.Thread(target=self.inject, args=(kind,), name=f"chaos-{kind}", daemon=True)
            for kind in FAULT_KINDS
        ]
        threading.Thread(target=self.collect_logs, name="chaos-logs", daemon=True).start()
        for thread in threads:
            thread.start()
        self.wait_for_the_backlog(threads)
        self.settle()
        elapsed = time.monotonic() - started
        restarts = self.container_restarts()
        self.logs.collect([pod.name for pod in self.pods])
        self.stop_workers_and_operator()
        figures = self.verdict(elapsed)
        figures.container_restarts = restarts
        return figures

    def prepare_database(self) -> None:
        self.dsn = self.stack.postgres.create_database(f"chaos_{uuid.uuid4().hex[:12]}")
        mean = self.mean_body_seconds()
        lengths = [self.rng.uniform(0, 2 * mean) for _ in range(self.settings.entries)]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for statement in chaos_app.SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO chaos_entry (created_at, body_seconds) "
                "SELECT now() + n * interval '1 microsecond', length "
                "FROM unnest(%s::float8[]) WITH ORDINALITY AS t(length, n)",
                [lengths],
            )
        say(f"seeded {self.settings.entries:,} entries, bodies {mean:.2f} s on average")

    def mean_body_seconds(self) -> float:
        """Long enough that the backlog lasts about as long as the fault schedule (faults on
        an idle system prove little), short enough that a run ends in minutes."""
        slots = self.settings.workers * self.settings.concurrency
        return min(2.0, max(0.05, 1.3 * slots * self.planned_seconds / self.settings.entries))

    def start_control_plane_side(self) -> None:
        plane = self.stack.plane
        plane.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
        plane.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
        plane.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/processingpolicies.celery-reconciler.io",
            "crd/processingstatuses.celery-reconciler.io",
        )  # fmt: skip
        plane.kubectl("create", "namespace", self.namespace)
        api_port = int(plane.server.rsplit(":", 1)[1])
        self.proxy = tcp_proxy.PausableProxy(target_port=api_port)
        self.operator_kubeconfig = plane.write_kubeconfig(
            self.workdir / "operator.kubeconfig",
            token=plane.admin_token,
            server=f"https://127.0.0.1:{self.proxy.port}",
        )
        self.start_operator()

    def start_operator(self) -> None:
        """Start the operator, again if it exits during start-up (the apiserver or the
        database may be away just then): what the kubelet does with a crashing container."""
        deadline = time.monotonic() + RECOVERY_SECONDS
        while True:
            try:
                self.operator = operators.start(
                    self.stack.plane,
                    log_dir=self.workdir,
                    kubeconfig=self.operator_kubeconfig,
                    namespaces=(self.namespace,),
                )
                return
            except processes.StartupFailed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def start_workers(self) -> None:
        assert self.broker is not None
        self.pods = [
            devstack_workers.start_worker_pod(
                node=self.stack.node,
                namespace=self.namespace,
                pod_name=f"chaos-worker-{number}",
                labels=WORKER_LABELS,
                broker_url=self.broker.url,
                dsn=self.dsn,
                concurrency=self.settings.concurrency,
                queue=chaos_app.QUEUE,
                app="devstack.chaos_app",
                app_source=ROOT / "devstack",
                wait=False,
            )
            for number in range(self.settings.workers)
        ]
        for pod in self.pods:
            pod.wait_ready(timeout_seconds=180)

    def apply_policy(self) -> None:
        assert self.broker is not None
        spec = {
            "source": {
                "databaseSecretRef": {"name": "chaos-db", "key": "dsn"},
                "table": "public.chaos_entry",
                "idColumn": "id",
                "pending": {"column": "processed", "equals": False},
                "orderBy": "created_at",
            },
            "task": {
                "name": chaos_app.TASK_NAME,
                "brokerSecretRef": {"name": "chaos-broker", "key": "url"},
                "queue": chaos_app.QUEUE,
            },
            "schedule": {"sweepInterval": "5s"},
            # Faults cost attempts (a kill mid-body is a failed attempt; a body whose
            # database restarted under it raises): enough of them, retried quickly.
            "retry": {
                "maxAttempts": 50,
                "initialDelay": "1s",
                "factor": 2,
                "maxDelay": "10s",
                "jitter": True,
            },
            "lease": {"timeout": "2m"},
            "workers": {"podSelector": {"matchLabels": WORKER_LABELS}},
            "limits": {"batchSize": 100, "maxInFlight": 200},
        }
        manifests = [
            _secret("chaos-db", "dsn", self.dsn),
            _secret("chaos-broker", "url", self.broker.url),
            {
                "apiVersion": "celery-reconciler.io/v1alpha1",
                "kind": "ProcessingPolicy",
                "metadata": {"name": POLICY},
                "spec": spec,
            },
        ]
        self.stack.plane.kubectl(
            "-n", self.namespace, "apply", "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}),
        )  # fmt: skip

    # -- faults ---------------------------------------------------------------------------

    def inject(self, kind: str) -> None:
        """``faults_per_kind`` faults of one kind at random gaps over the planned time."""
        rng = random.Random(f"{self.settings.seed}:{kind}")
        mean_gap = self.planned_seconds / self.settings.faults_per_kind
        try:
            for _ in range(self.settings.faults_per_kind):
                if self.stopping.wait(rng.uniform(0.2 * mean_gap, 1.5 * mean_gap)):
                    return
                pending = self.pending() > 0
                getattr(self, f"fault_{kind}")(rng)
                with self.fault_lock:
                    self.faults[kind] += 1
                    self.faults_while_pending += pending
        except Exception as error:  # the run must fail loudly, not hang waiting for a thread
            self.failures.append(f"injecting {kind} failed: {type(error).__name__}: {error}")
            self.stopping.set()

    def fault_worker_kill(self, rng: random.Random) -> None:
        pod = rng.choice(self.pods)
        pid = _retry(lambda: pod.main_pid(), what=f"{pod.name}'s container to run (to kill it)")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Noted once the process is dead: a body of this container ended no later.
        with self.fault_lock:
            self.kills.append((pod.name, datetime.datetime.now(datetime.UTC)))

    def fault_operator_kill(self, rng: random.Random) -> None:
        mid_sweep = self.wait_for_a_sweep(timeout_seconds=rng.uniform(2.0, 8.0))
        with self.operator_lock:
            assert self.operator is not None
            self.operator.kill()
            self.start_operator()
        with self.fault_lock:
            self.mid_sweep_kills += mid_sweep

    def wait_for_a_sweep(self, *, timeout_seconds: float) -> bool:
        """Until the operator's sweep connection is busy (a statement running, or a claim
        transaction open), so the kill that follows lands mid-sweep; False if no sweep
        touched the database within the timeout (the kill then lands between sweeps)."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3) as conn:
                    while time.monotonic() < deadline:
                        row = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() "
                            "AND application_name = 'celery-reconciler' "
                            "AND state IN ('active', 'idle in transaction')"
                        ).fetchone()
                        if row is not None and row[0] > 0:
                            return True
                        time.sleep(0.005)
            except psycopg.Error:
                time.sleep(0.2)  # PostgreSQL is restarting: no sweep runs either
        return False

    def fault_redis_restart(self, rng: random.Random) -> None:
        assert self.broker is not None
        self.broker.restart()

    def fault_postgres_restart(self, rng: random.Random) -> None:
        self.stack.postgres.stop()
        self.stack.postgres.start()

    def fault_apiserver_restart(self, rng: random.Random) -> None:
        self.stack.plane.restart_apiserver()

    def fault_pod_watch_cut(self, rng: random.Random) -> None:
        assert self.proxy is not None
        self.proxy.pause()
        time.sleep(rng.uniform(0.5, 3.0))
        self.proxy.cut()
        self.proxy.resume()

    # -- waiting --------------------------------------------------------------------------

    def pending(self) -> int:
        """Entries not processed yet (-1 while the database is away)."""
        try:
            with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                row = conn.execute("SELECT count(*) FROM chaos_entry WHERE NOT processed")
                return int(row.fetchone()[0])  # type: ignore[index]
        except psycopg.Error:
            return -1

    def wait_for_the_backlog(self, threads: list[threading.Thread]) -> None:
        """Until every fault is injected and every entry processed; a run that stops making
        progress for ``STUCK_SECONDS`` is a failure, reported with the ledger's view."""
        last_pending, progressed_at, reported_at = -1, time.monotonic(), 0.0
        while True:
            if self.failures:
                raise ChaosFailure(f"seed {self.settings.seed}: " + "; ".join(self.failures))
            pending = self.pending()
            now = time.monotonic()
            if pending != last_pending and pending >= 0:
                last_pending, progressed_at = pending, now
            if now - reported_at > 15:
                with self.fault_lock:
                    injected = sum(self.faults.values())
                say(f"{pending:,} entries pending, {injected} faults injected")
                reported_at = now
            if pending == 0 and not any(thread.is_alive() for thread in threads):
                return
            if pending != 0 and now - progressed_at > STUCK_SECONDS:
                self.stopping.set()
                raise ChaosFailure(
                    f"seed {self.settings.seed}: stuck — {pending} entries pending and none "
                    f"processed for {STUCK_SECONDS:.0f} s; ledger: {self.ledger_summary()}; "
                    f"logs in {self.workdir}"
                )
            time.sleep(1)

    def settle(self) -> None:
        """Let runs still in a body when the last entry was processed (a stale delivery
        that will lose its fence, say) end, so the verdict sees them."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.unfinished_unexplained() > 0:
            time.sleep(1)

    def unfinished_unexplained(self) -> int:
        with self.fault_lock:
            kills = list(self.kills)
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT pod, pid, started_at FROM chaos_runs WHERE finished_at IS NULL"
            ).fetchall()
        self.logs.collect([pod.name for pod in self.pods])
        fences = set(self.logs.fences)
        return sum(
            1
            for pod, pid, started in rows
            if not any(p == pod and at > started for p, at in kills)
            and not any(p == pod and q == pid and at > started for p, q, at in fences)
        )

    def ledger_summary(self) -> str:
        try:
            with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                rows = conn.execute(
                    "SELECT state, count(*) FROM celery_reconciler.entries GROUP BY state"
                ).fetchall()
            return ", ".join(f"{state} {count}" for state, count in rows) or "empty"
        except psycopg.Error as error:
            return f"unreadable ({type(error).__name__})"

    def container_restarts(self) -> int:
        """Worker container restarts the kubelet counted: beside the kills, any death of a
        worker's main process we did not cause shows here."""
        return sum(_retry(pod.restart_count, what="a worker Pod's status") for pod in self.pods)

    def collect_logs(self) -> None:
        while not self.stopping.wait(1.0):
            self.logs.collect([pod.name for pod in self.pods])

    def stop_workers_and_operator(self) -> None:
        self.stopping.set()
        for pod in self.pods:
            pod.delete(grace_seconds=1, wait=False)
        for pod in self.pods:
            pod.delete(grace_seconds=1, wait=True)
        with self.operator_lock:
            if self.operator is not None:
                self.operator.stop()
                self.operator = None

    # -- the verdict ----------------------------------------------------------------------

    def verdict(self, elapsed: float) -> Figures:
        """Every figure and invariant from the body's own tables and the kill times."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            with conn.cursor().copy("COPY chaos_kills (pod, killed_at) FROM STDIN") as copy:
                for pod, at in self.kills:
                    copy.write_row((pod, at))
            with conn.cursor().copy("COPY chaos_fences (pod, pid, fenced_at) FROM STDIN") as copy:
                for fence in sorted(self.logs.fences):
                    copy.write_row(fence)
            return _verdict(
                conn,
                seed=self.settings.seed,
                faults=dict(self.faults),
                faults_while_pending=self.faults_while_pending,
                mid_sweep_kills=self.mid_sweep_kills,
                seconds=elapsed,
            )

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(Exception):
            self.stop_workers_and_operator()
        if self.proxy is not None:
            self.proxy.close()
        if self.broker is not None:
            self.broker.stop()
        self.stack.plane.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)


# What a worker's guardian logs once a process that ran bodies is gone (killed by itself or
# by the guardian), before it records the proof that lets the entries run again; behind the
# container runtime's own timestamp (CRI log format: RFC 3339, nanoseconds, UTC). The
# process logs nothing itself before its kill: a blocked log handler would stop the kill.
_SELF_FENCE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z .*worker process "
    r"\(pid (\d+)\) is gone"
)


class _WorkerLogs:
    """Keeps every worker container's log and dates every self-fence in it.

    The kubelet deletes the log of a container older than the previous one, and a Pod's
    logs with the Pod; a run that kills containers dozens of times must copy them as they
    come (to ``worker-logs/<pod>.log`` in the run's directory) or lose the only record of
    when a worker process killed itself — the end of the runs it held."""

    def __init__(self, *, node_: node.Node, namespace: str, directory: Path) -> None:
        self.node = node_
        self.namespace = namespace
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.offsets: dict[Path, int] = {}
        self.fences: set[tuple[str, int, datetime.datetime]] = set()
        self.lock = threading.Lock()

    def collect(self, pods: Sequence[str]) -> None:
        with self.lock:
            for pod in pods:
                for path in sorted(
                    self.node.pod_logs.glob(f"{self.namespace}_{pod}_*/worker/*.log")
                ):
                    self._read(pod, path)

    def _read(self, pod: str, path: Path) -> None:
        try:
            with path.open("rb") as log:
                log.seek(self.offsets.get(path, 0))
                data = log.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self.offsets[path] = self.offsets.get(path, 0) + len(complete)
        if not complete:
            return
        with (self.directory / f"{pod}.log").open("ab") as copy:
            copy.write(complete)
        for line in complete.decode(errors="replace").splitlines():
            found = _SELF_FENCE.match(line)
            if found:
                seconds, fraction, pid = found.groups()
                at = datetime.datetime.fromisoformat(seconds).replace(tzinfo=datetime.UTC)
                micros = int((fraction or "0")[:6].ljust(6, "0"))
                self.fences.add((pod, int(pid), at.replace(microsecond=micros)))


# A run without an end ended when its process died: at the first self-fence of its process
# after it started, or at the first kill of its Pod after it started (each noted once the
# process was gone); with neither its end is unknown, and it counts as never ending.
_RUN_ENDS = """
    SELECT r.id, r.entry_id, r.pod, r.started_at, r.finished_at, r.exclusive, r.outcome,
           coalesce(r.finished_at,
                    least((SELECT min(f.fenced_at) FROM chaos_fences f
                           WHERE f.pod = r.pod AND f.pid = r.pid AND f.fenced_at > r.started_at),
                          (SELECT min(k.killed_at) FROM chaos_kills k
                           WHERE k.pod = r.pod AND k.killed_at > r.started_at)),
                    'infinity') AS ended_at
    FROM chaos_runs r
"""


def _verdict(
    conn: psycopg.Connection[Any],
    *,
    seed: int,
    faults: dict[str, int],
    faults_while_pending: int,
    mid_sweep_kills: int,
    seconds: float,
) -> Figures:
    def scalar(query: str) -> int:
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])

    entries = scalar("SELECT count(*) FROM chaos_entry")
    processed = scalar("SELECT count(*) FROM chaos_entry WHERE processed")
    violations = []
    lost = conn.execute(
        "SELECT e.id FROM chaos_entry e WHERE NOT e.processed "
        "OR NOT EXISTS (SELECT 1 FROM chaos_effects f WHERE f.entry_id = e.id) ORDER BY e.id"
    ).fetchall()
    if lost:
        violations.append(f"{len(lost)} lost entries (no effect), e.g. {[r[0] for r in lost[:10]]}")
    doubled = conn.execute(
        "SELECT entry_id, count(*) FROM chaos_effects GROUP BY entry_id HAVING count(*) > 1 "
        "ORDER BY entry_id"
    ).fetchall()
    if doubled:
        violations.append(f"{len(doubled)} entries with duplicate effects, e.g. {doubled[:10]}")
    # Times as text: a run that never ended ends at 'infinity', which no datetime holds.
    overlapping = conn.execute(
        f"""
        WITH runs AS ({_RUN_ENDS})
        SELECT a.entry_id, a.id, a.pod, a.started_at::text, a.ended_at::text, b.id, b.pod,
               b.started_at::text
        FROM runs a JOIN runs b ON a.entry_id = b.entry_id AND a.id < b.id
        WHERE a.started_at < b.ended_at AND b.started_at < a.ended_at
        ORDER BY a.entry_id
        """  # noqa: S608 — a constant subquery, no input
    ).fetchall()
    if overlapping:
        violations.append(
            f"{len(overlapping)} overlapping pairs of runs (entry, run, pod, start, end, "
            f"run, pod, start), e.g. {overlapping[:5]}"
        )
    locked_out = conn.execute(
        "SELECT entry_id, id, pod, started_at::text FROM chaos_runs WHERE NOT exclusive ORDER BY id"
    ).fetchall()
    if locked_out:
        violations.append(
            f"{len(locked_out)} runs started while another session held the entry's lock, "
            f"e.g. {locked_out[:5]}"
        )
    latencies_rows = conn.execute(
        """
        SELECT r.entry_id,
               extract(epoch FROM (SELECT min(n.started_at) FROM chaos_runs n
                                   WHERE n.entry_id = r.entry_id AND n.started_at > k.killed_at)
                                  - k.killed_at)
        FROM chaos_runs r
        JOIN LATERAL (SELECT min(k.killed_at) AS killed_at FROM chaos_kills k
                      WHERE k.pod = r.pod AND k.killed_at > r.started_at) k ON true
        WHERE r.finished_at IS NULL AND k.killed_at IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM chaos_fences f WHERE f.pod = r.pod AND f.pid = r.pid
                          AND f.fenced_at > r.started_at AND f.fenced_at < k.killed_at)
        """
    ).fetchall()
    latencies = [float(value) for _, value in latencies_rows if value is not None]
    untraced = scalar(f"SELECT count(*) FROM ({_RUN_ENDS}) AS r WHERE ended_at = 'infinity'")  # noqa: S608
    return Figures(
        seed=seed,
        entries=entries,
        processed=processed,
        runs=scalar("SELECT count(*) FROM chaos_runs"),
        faults=faults,
        faults_while_pending=faults_while_pending,
        mid_sweep_kills=mid_sweep_kills,
        latencies=latencies,
        killed_runs=len(latencies_rows),
        untraced_runs=untraced,
        fence_lost=scalar("SELECT count(*) FROM chaos_runs WHERE outcome = 'FenceLost'"),
        self_fenced=scalar("SELECT count(*) FROM chaos_fences"),
        seconds=seconds,
        violations=violations,
    )


def _secret(name: str, key: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {key: value},
    }


def _running(pid: int) -> bool:
    """Whether a process still runs code. A container's main process killed with SIGKILL
    is dead once it is a zombie — the kernel has killed every process of its PID namespace
    by then — though it stays visible until its shim reaps it, which a loaded machine can
    delay; waiting for that would date the kill late and the runs it ended with it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _retry(call: Callable[[], int], *, what: str) -> int:
    """``call()`` until it answers: a fault may need a component another fault took down."""
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise ChaosFailure(f"gave up waiting for {what}") from None
            time.sleep(0.5)


# -- python -m devstack chaos -----------------------------------------------------------


@contextlib.contextmanager
def own_stack(workdir: Path) -> Iterator[Stack]:
    """PostgreSQL, kube-apiserver and a node of the run's own, stopped at the end."""
    database = postgres.start(workdir / "postgres")
    try:
        plane = kube.start(workdir / "kube")
        try:
            worker_node = node.start(plane, workdir / "node")
            try:
                yield Stack(plane=plane, node=worker_node, postgres=database, workdir=workdir)
            finally:
                worker_node.stop()
                node.remove_state(workdir / "node")
        finally:
            plane.stop()
    finally:
        database.remove()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack chaos", description=__doc__)
    parser.add_argument("--seed", type=int, help="repeat a run's schedule (default: random)")
    parser.add_argument("--entries", type=int, default=10_000, help="backlog (10000)")
    parser.add_argument(
        "--faults-per-kind", type=int, default=100, help="faults of each kind (100)"
    )
    parser.add_argument("--workers", type=int, default=3, help="worker Pods (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per Pod (2)")
    args = parser.parse_args(argv)
    settings = Settings(
        seed=args.seed if args.seed is not None else new_seed(),
        entries=args.entries,
        faults_per_kind=args.faults_per_kind,
        workers=args.workers,
        concurrency=args.concurrency,
    )
    workdir = Path(tempfile.mkdtemp(prefix="cr-chaos-"))
    say(f"starting PostgreSQL, kube-apiserver and a node (logs in {workdir})")
    try:
        with own_stack(workdir) as stack:
            run(stack, settings)
    except ChaosFailure as failure:
        print(f"chaos: FAILED: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0
