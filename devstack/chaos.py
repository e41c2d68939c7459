"""The chaos driver: a backlog processed while every component we depend on fails at random.

One driver serves ``tests/chaos`` (a small fixed-seed run inside ``make test``, on the
session's stack) and ``make chaos`` (``python -m devstack chaos``: 10,000 entries and
``DEFAULT_FAULTS_PER_KIND`` faults of every kind, on a stack of its own). It

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
   ``worker_freeze``      every process of a worker Pod (celery's main process, its pool,
                          its guardian) stopped with SIGSTOP for twice the heartbeat
                          timeout, then SIGCONT: a paused machine; only the kubelet (the
                          liveness probe) or the thawed guardian may stop its bodies, and
                          their entries may move only once they are gone
   ``gil_hold``           an entry about to run armed so that its body spends 1.5 heartbeat
                          timeouts in one C call that keeps the GIL (``celery_app.faults``):
                          its own heartbeat and watchdog starve, the guardian must kill it

   A freeze holds a Pod for 40 s and a hold a slot for 30 s at the default heartbeat timeout
   (20 s, ``--heartbeat-timeout``; a shorter one restarts healthy workers on a loaded node),
   so these two kinds come ``--long-faults-per-kind`` times (a fifth of the others by
   default), one freeze at a time; the schedule stretches to fit them. An outage (operator
   kill, Redis, PostgreSQL or apiserver restart) waits until an entry was processed after
   the previous outage ended, and a worker kill picks a Pod that ran a body since its last
   kill: every fault then hits a system that had come back, and the run prints how long
   they waited.

4. waits until every entry is processed (failing loudly if progress stops), and checks the
   invariants with its own SQL over the body's own tables — never our ledger: **0 lost**
   (every entry has its effect), **0 duplicate effects** (exactly one effect row per entry:
   ``fenced_transaction``'s exactly-once claim), **0 stale plain effects** (no write outside
   the fence committed after another run of its entry had started), **0 overlapping runs**
   (no two runs of an entry overlap in time — frozen and GIL-bound runs included, bounded
   as ``devstack.chaos_overlaps`` says — and no run started while another held the entry's
   advisory lock). It prints rescue latency percentiles (worker kill, freeze or GIL hold ->
   the entry starting again, from the run table and the fault times) and the count of each
   fault kind.

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
import functools
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

from devstack import (
    chaos_app,
    chaos_overlaps,
    kube,
    node,
    operators,
    postgres,
    processes,
    redis,
    tcp_proxy,
)
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
    "worker_freeze",
    "gil_hold",
)
WORKER_LABELS = {"app": "chaos-worker"}
POLICY = "chaos"
# No entry processed for this long, with entries left, is a stuck run: fail and say so.
STUCK_SECONDS = 300.0
# How long a fault may wait for its target to come back (a Pod to run, the apiserver to
# answer) before the driver gives up loudly.
RECOVERY_SECONDS = 180.0
# A freeze lasts this many heartbeat timeouts (issue 21's attack), a GIL hold this many.
FREEZE_TIMEOUTS = 2.0
GIL_HOLD_TIMEOUTS = 1.5
LONG_FAULT_KINDS = frozenset({"worker_freeze", "gil_hold"})
# ``make chaos``'s faults of each kind. Each outage costs the system seconds to come back
# from (an operator start and first sweep, a lost queue re-dispatched, bodies cut by a
# database restart) and waits for it (OUTAGE_KINDS): at 100 of each of the four outage
# kinds a run on this machine processed 65 entries in its first 110 faults (6 minutes) and
# would have lasted about an hour, nearly all of it recovering. 25 of each (and 5 freezes
# and GIL holds) still overlap every kind with every other, in about ten minutes.
DEFAULT_FAULTS_PER_KIND = 25
# Faults that take away a component every entry needs (the operator, the broker, the
# database, the apiserver a restarted operator lists its policies from). Each waits until an
# entry was processed after the previous one of them: restarting the apiserver every 5 s when
# it takes 2-5 s to come back kept it down for most of a run, no restarted operator could
# list its policies, and 0 of 10,000 entries were processed in 288 faults — a run that
# proves nothing about the next fault. Worker kills, freezes, GIL holds and cut watches
# come on their own schedule: they are what the rescue must keep up with.
OUTAGE_KINDS = frozenset(
    {"operator_kill", "redis_restart", "postgres_restart", "apiserver_restart"}
)
# How far from the head of the pending queue a GIL hold is armed: an entry about to run.
GIL_ARMING_WINDOW = 20
# An armed GIL hold whose entry did not start within this long is moved to another entry.
GIL_FIRING_SECONDS = 60.0
# How often the driver looks whether a process it froze is gone yet.
DEATH_POLL_SECONDS = 0.1


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
    heartbeat_timeout_seconds: float = 20.0
    long_faults_per_kind: int | None = None  # worker_freeze, gil_hold; None: a fifth

    def faults_of(self, kind: str) -> int:
        if kind not in LONG_FAULT_KINDS:
            return self.faults_per_kind
        if self.long_faults_per_kind is not None:
            return self.long_faults_per_kind
        return max(1, self.faults_per_kind // 5)

    @property
    def freeze_seconds(self) -> float:
        return FREEZE_TIMEOUTS * self.heartbeat_timeout_seconds

    @property
    def gil_hold_seconds(self) -> float:
        return GIL_HOLD_TIMEOUTS * self.heartbeat_timeout_seconds


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
    overlaps: int = 0
    plain_repeated: int = 0
    frozen_runs: int = 0
    frozen_runs_finished_late: int = 0
    freeze_latencies: list[float] = dataclasses.field(default_factory=list)
    gil_latencies: list[float] = dataclasses.field(default_factory=list)
    frozen_deaths: int = 0
    # Seconds each outage waited for an entry processed since the previous one (OUTAGE_KINDS).
    outage_waits: list[float] = dataclasses.field(default_factory=list)
    # Seconds each worker kill waited for a Pod that ran a body since its last kill.
    kill_waits: list[float] = dataclasses.field(default_factory=list)
    # Times the operator exited on its own and was started again.
    operator_exits: int = 0

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
        out.append(
            f"  operator exits on its own (started again, as a kubelet would): "
            f"{self.operator_exits}"
        )
        if self.kill_waits:
            out.append(
                _waits_line(
                    "worker kills", "a Pod that ran a body since its last kill", self.kill_waits
                )
            )
        if self.outage_waits:
            out.append(
                _waits_line(
                    "outages (operator, Redis, PostgreSQL, apiserver)",
                    "an entry processed since the previous one",
                    self.outage_waits,
                )
            )
        out.append(
            f"  worker freezes: {self.frozen_runs} runs caught mid-body, "
            f"{self.frozen_runs_finished_late} of them wrote their end after the thaw; "
            f"processes of worker Pods (probes included) the driver saw gone: {self.frozen_deaths}"
        )
        out += [
            _latency_line("worker kill -> killed body's entry running again", self.latencies),
            _latency_line("freeze -> frozen body's entry running again", self.freeze_latencies),
            _latency_line("GIL hold -> its entry running again", self.gil_latencies),
        ]
        out.append(
            f"  overlapping pairs of runs: {self.overlaps}; plain (unfenced) effects repeated "
            f"after a crash (at-least-once, not a violation): {self.plain_repeated}"
        )
        out.append(
            "  invariants: "
            + (
                "0 lost, 0 duplicate effects, 0 stale plain effects, 0 overlapping runs"
                if not self.violations
                else ""
            )
        )
        out += [f"  VIOLATED: {violation}" for violation in self.violations]
        return out


def _latency_line(what: str, values: Sequence[float]) -> str:
    if not values:
        return f"  rescue latency ({what}): none caught a body mid-run"
    return (
        f"  rescue latency ({what}), n={len(values)}: p50 {percentile(values, 0.5):.2f} s, "
        f"p90 {percentile(values, 0.9):.2f} s, p99 {percentile(values, 0.99):.2f} s, "
        f"max {max(values):.2f} s, mean {statistics.fmean(values):.2f} s"
    )


def _waits_line(faults: str, waited_for: str, values: Sequence[float]) -> str:
    return (
        f"  {faults} that waited for {waited_for}: n={len(values)}, "
        f"p50 {percentile(values, 0.5):.2f} s, p90 {percentile(values, 0.9):.2f} s, "
        f"max {max(values):.2f} s"
    )


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
        self.freezes: list[tuple[str, datetime.datetime, datetime.datetime]] = []
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.deaths = _DeathWatch(stopping=self.stopping, failures=self.failures)
        self.faults: collections.Counter[str] = collections.Counter()
        self.faults_while_pending = 0
        # Processed entries when the last outage ended (see OUTAGE_KINDS); -1: none yet.
        self.processed_after_outage = -1
        self.outage_waits: list[float] = []
        self.kill_waits: list[float] = []  # for a Pod that ran a body since its last kill
        self.operator_exits = 0
        self.mid_sweep_kills = 0
        self.fault_lock = threading.Lock()
        self.logs = _WorkerLogs(
            node_=stack.node, namespace=self.namespace, directory=self.workdir / "worker-logs"
        )
        # Seconds the fault threads spread their faults over; bodies are sized to it. A
        # freeze blocks its thread for its whole length: the schedule makes room for them.
        self.planned_seconds = max(
            60.0,
            settings.faults_per_kind * 5.0,
            settings.faults_of("worker_freeze") * (settings.freeze_seconds + 3.0),
        )

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
            f"{self.settings.concurrency} processes, heartbeat timeout "
            f"{self.settings.heartbeat_timeout_seconds:g} s; injecting "
            + ", ".join(f"{kind} x{self.settings.faults_of(kind)}" for kind in FAULT_KINDS)
        )
        threads = [
            threading.Thread(target=self.inject, args=(kind,), name=f"chaos-{kind}", daemon=True)
            for kind in FAULT_KINDS
        ]
        threading.Thread(target=self.collect_logs, name="chaos-logs", daemon=True).start()
        threading.Thread(
            target=self.supervise_operator, name="chaos-operator-restarts", daemon=True
        ).start()
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
        figures.outage_waits = list(self.outage_waits)
        figures.kill_waits = list(self.kill_waits)
        figures.operator_exits = self.operator_exits
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
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise
                time.sleep(1)

    def supervise_operator(self) -> None:
        """Starts the operator again when it exits on its own, as the kubelet restarts a
        container (an operator that finds it serves nothing exits: ``served``)."""
        try:
            while not self.stopping.wait(0.5):
                with self.operator_lock:
                    if self.stopping.is_set() or self.operator is None:
                        continue
                    if self.operator.process.running():
                        continue
                    self.operator_exits += 1
                    self.start_operator()
        except Exception as error:  # the run must fail loudly, not run on without an operator
            self.failures.append(f"restarting the operator failed: {type(error).__name__}: {error}")
            self.stopping.set()

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
                extra_env={
                    "CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(
                        self.settings.heartbeat_timeout_seconds
                    )
                },
                wait=False,
            )
            for number in range(self.settings.workers)
        ]
        for pod in self.pods:
            pod.wait_ready(timeout_seconds=180)
        self.deaths.start(
            pods={
                pod.name: devstack_workers.pod_uid(
                    self.stack.plane, namespace=self.namespace, name=pod.name
                )
                for pod in self.pods
            },
            cgroup_root=self.stack.node.cgroup_root,
        )

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
        count = self.settings.faults_of(kind)
        mean_gap = self.planned_seconds / max(1, count)
        took = 0.0  # a fault that lasts (a freeze) eats into the gap after it
        try:
            for _ in range(count):
                gap = rng.uniform(0.2 * mean_gap, 1.5 * mean_gap)
                if self.stopping.wait(max(0.2, gap - took)):
                    return
                if kind in OUTAGE_KINDS and not self.wait_for_progress_since_the_last_outage():
                    return
                pending = self.pending() > 0
                began = time.monotonic()
                getattr(self, f"fault_{kind}")(rng)
                took = time.monotonic() - began
                if kind in OUTAGE_KINDS:
                    self.note_the_end_of_an_outage()
                with self.fault_lock:
                    self.faults[kind] += 1
                    self.faults_while_pending += pending
        except Exception as error:  # the run must fail loudly, not hang waiting for a thread
            self.failures.append(f"injecting {kind} failed: {type(error).__name__}: {error}")
            self.stopping.set()

    def fault_worker_kill(self, rng: random.Random) -> None:
        pod = self.pick_a_working_pod(rng)
        pid = _retry(lambda: pod.main_pid(), what=f"{pod.name}'s container to run (to kill it)")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Noted once the process is dead: a body of this container ended no later.
        with self.fault_lock:
            self.kills.append((pod.name, datetime.datetime.now(datetime.UTC)))

    def pick_a_working_pod(self, rng: random.Random) -> devstack_workers.WorkerPod:
        """A Pod whose container ran a body since the driver last killed it, waiting for
        one: a kill then hits a worker doing work, and no Pod is killed again before it
        came back. On a loaded node a worker takes tens of seconds to start, and a kill
        every 5 s kept all three down (with the kubelet's crash-loop back-off on top)."""
        began = time.monotonic()
        deadline = began + RECOVERY_SECONDS
        while True:
            working = [pod for pod in self.pods if self.ran_a_body_since_its_last_kill(pod)]
            if working or time.monotonic() > deadline or self.stopping.is_set():
                break
            if self.pending() == 0:
                break
            self.stopping.wait(0.5)
        with self.fault_lock:
            self.kill_waits.append(time.monotonic() - began)
        return rng.choice(working or self.pods)

    def ran_a_body_since_its_last_kill(self, pod: devstack_workers.WorkerPod) -> bool:
        with self.fault_lock:
            kills = [at for name, at in self.kills if name == pod.name]
        since = max(kills, default=datetime.datetime.min.replace(tzinfo=datetime.UTC))
        try:
            with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                row = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM chaos_runs WHERE pod = %s AND started_at > %s)",
                    [pod.name, since],
                ).fetchone()
                return bool(row and row[0])
        except psycopg.Error:
            return False

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

    def fault_worker_freeze(self, rng: random.Random) -> None:
        """SIGSTOP every process of a worker Pod's running container for
        ``freeze_seconds``, then SIGCONT; each frozen process is watched until it is gone,
        the end of any run it held that never wrote its own."""
        pod = rng.choice(self.pods)
        main = _retry(lambda: pod.main_pid(), what=f"{pod.name}'s container to run (to freeze it)")
        frozen = _freeze_tree(main)
        if not frozen:
            return  # the container died just now (a kill): nothing left to freeze
        frozen_at = datetime.datetime.now(datetime.UTC)
        # Watched from now: a kill while frozen is dated within a poll, before a new
        # container's process could take the same PID in its namespace.
        self.deaths.watch(pod.name, frozen)
        time.sleep(self.settings.freeze_seconds)
        for process in frozen:
            with contextlib.suppress(ProcessLookupError):
                if process.alive():
                    os.kill(process.host_pid, signal.SIGCONT)
        thawed_at = datetime.datetime.now(datetime.UTC)
        with self.fault_lock:
            self.freezes.append((pod.name, frozen_at, thawed_at))

    def fault_gil_hold(self, rng: random.Random) -> None:
        """Arm an entry about to run with a one-shot GIL hold, and wait until a body fired
        it; an armed entry that did not start in time is disarmed and another armed."""
        deadline = time.monotonic() + RECOVERY_SECONDS
        while time.monotonic() < deadline and not self.stopping.is_set():
            entry = _retry(lambda: self.arm_gil_hold(rng), what="PostgreSQL (to arm a GIL hold)")
            armed_until = time.monotonic() + GIL_FIRING_SECONDS
            while time.monotonic() < armed_until and not self.stopping.is_set():
                if _retry(functools.partial(self.gil_hold_fired, entry), what="PostgreSQL"):
                    return
                time.sleep(0.2)
            if _retry(functools.partial(self.disarm_gil_hold, entry), what="PostgreSQL") == 0:
                return  # it fired as it was disarmed
        if self.stopping.is_set():
            return
        raise ChaosFailure(f"no entry ran a GIL hold within {RECOVERY_SECONDS:.0f} s")

    def arm_gil_hold(self, rng: random.Random) -> int:
        """An entry near the head of the pending queue that has not run yet (with none
        left, one more entry at the head): it runs within seconds."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3) as conn:
            candidates = [
                int(row[0])
                for row in conn.execute(
                    "SELECT e.id FROM chaos_entry e WHERE NOT e.processed "
                    "AND NOT EXISTS (SELECT 1 FROM chaos_runs r WHERE r.entry_id = e.id) "
                    "AND NOT EXISTS (SELECT 1 FROM chaos_gil_holds h WHERE h.entry_id = e.id) "
                    "ORDER BY e.created_at, e.id LIMIT %s",
                    [GIL_ARMING_WINDOW],
                )
            ]
            if candidates:
                entry = rng.choice(candidates)
            else:
                row = conn.execute(
                    "INSERT INTO chaos_entry (created_at, body_seconds) "
                    "SELECT min(created_at) - interval '1 microsecond', %s FROM chaos_entry "
                    "RETURNING id",
                    [self.mean_body_seconds()],
                ).fetchone()
                assert row is not None
                entry = int(row[0])
            conn.execute(
                "INSERT INTO chaos_gil_holds (entry_id, seconds) VALUES (%s, %s)",
                [entry, self.settings.gil_hold_seconds],
            )
            return entry

    def gil_hold_fired(self, entry: int) -> bool:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT fired_at IS NOT NULL FROM chaos_gil_holds WHERE entry_id = %s", [entry]
            ).fetchone()
            return bool(row and row[0])

    def disarm_gil_hold(self, entry: int) -> int:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3) as conn:
            return conn.execute(
                "DELETE FROM chaos_gil_holds WHERE entry_id = %s AND fired_at IS NULL", [entry]
            ).rowcount

    # -- waiting --------------------------------------------------------------------------

    def wait_for_progress_since_the_last_outage(self) -> bool:
        """Until an entry was processed after the last outage ended, or none is left (False
        once the run stops). A run that never recovers is failed by the stuck check."""
        began = time.monotonic()
        while not self.stopping.is_set():
            with self.fault_lock:
                before = self.processed_after_outage
            processed, pending = self.progress()
            if processed > before or (processed >= 0 and pending == 0):
                with self.fault_lock:
                    self.outage_waits.append(time.monotonic() - began)
                return True
            self.stopping.wait(0.5)
        return False

    def note_the_end_of_an_outage(self) -> None:
        processed = self.processed()
        while processed < 0 and not self.stopping.wait(0.5):
            processed = self.processed()
        with self.fault_lock:
            self.processed_after_outage = processed

    def progress(self) -> tuple[int, int]:
        """Entries processed so far and entries not processed yet; (-1, -1) while the
        database is away."""
        try:
            with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE processed), "
                    "count(*) FILTER (WHERE NOT processed) FROM chaos_entry"
                ).fetchone()
                assert row is not None
                return int(row[0]), int(row[1])
        except psycopg.Error:
            return -1, -1

    def processed(self) -> int:
        """Entries processed so far (-1 while the database is away)."""
        return self.progress()[0]

    def pending(self) -> int:
        """Entries not processed yet (-1 while the database is away)."""
        return self.progress()[1]

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
        with psycopg.connect(self.dsn) as conn:
            runs = _runs(conn, unfinished_only=True)
        self.logs.collect([pod.name for pod in self.pods])
        return sum(
            1
            for interval in chaos_overlaps.intervals(runs, self.endings())
            if interval.ended_at == chaos_overlaps.NEVER
        )

    def endings(self) -> chaos_overlaps.Endings:
        with self.fault_lock:
            kills = list(self.kills)
        return chaos_overlaps.Endings(
            pod_kills=kills, process_ends=[*self.logs.fences, *self.deaths.recorded()]
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
        self.delete_pods()
        self.stop_operator()

    def delete_pods(self) -> None:
        for pod in self.pods:
            pod.delete(grace_seconds=1, wait=False)
        for pod in self.pods:
            pod.delete(grace_seconds=1, wait=True)

    def stop_operator(self) -> None:
        # A fault thread may be restarting it; it gives up once ``stopping`` is set.
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
            with conn.cursor().copy("COPY chaos_deaths (pod, pid, died_at) FROM STDIN") as copy:
                for death in self.deaths.recorded():
                    copy.write_row(death)
            with conn.cursor().copy(
                "COPY chaos_freezes (pod, frozen_at, thawed_at) FROM STDIN"
            ) as copy:
                for freeze in self.freezes:
                    copy.write_row(freeze)
            return _verdict(
                conn,
                seed=self.settings.seed,
                faults=dict(self.faults),
                faults_while_pending=self.faults_while_pending,
                mid_sweep_kills=self.mid_sweep_kills,
                seconds=elapsed,
            )

    def close(self) -> None:
        """Stops everything the run started, every step even if one before it fails or an
        interrupt (Ctrl-C) lands in it: local processes first (they leak past the driver),
        then the Pods and the namespace."""
        self.stopping.set()
        # A failure of one step must not hide the run's own outcome (this runs in a finally).
        with contextlib.suppress(Exception), contextlib.ExitStack() as cleanup:
            cleanup.callback(
                self.stack.plane.kubectl,
                "delete", "namespace", self.namespace, "--wait=false", check=False,
            )  # fmt: skip
            cleanup.callback(self.delete_pods)
            if self.broker is not None:
                cleanup.callback(self.broker.stop)
            if self.proxy is not None:
                cleanup.callback(self.proxy.close)
            cleanup.callback(self.stop_operator)


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


# Every run as its own rows recorded it; chaos_overlaps bounds the ones without an end.
_RUNS = "SELECT id, entry_id, pod, pid, started_at, finished_at FROM chaos_runs ORDER BY id"
_UNFINISHED_RUNS = (
    "SELECT id, entry_id, pod, pid, started_at, finished_at FROM chaos_runs "
    "WHERE finished_at IS NULL ORDER BY id"
)


def _runs(
    conn: psycopg.Connection[Any], *, unfinished_only: bool = False
) -> list[chaos_overlaps.Run]:
    return [
        chaos_overlaps.Run(
            run_id=run_id,
            entry_id=entry_id,
            pod=pod,
            pid=pid,
            started_at=started_at,
            finished_at=finished_at,
        )
        for run_id, entry_id, pod, pid, started_at, finished_at in conn.execute(
            _UNFINISHED_RUNS if unfinished_only else _RUNS
        )
    ]


def _endings(conn: psycopg.Connection[Any]) -> chaos_overlaps.Endings:
    """What the driver wrote at the end: its kills, the guardians' self-fences and the
    deaths it saw of frozen Pods' processes."""
    return chaos_overlaps.Endings(
        pod_kills=[(pod, at) for pod, at in conn.execute("SELECT pod, killed_at FROM chaos_kills")],
        process_ends=[
            (pod, pid, at)
            for pod, pid, at in conn.execute(
                "SELECT pod, pid, fenced_at FROM chaos_fences "
                "UNION ALL SELECT pod, pid, died_at FROM chaos_deaths"
            )
        ],
    )


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
    # A plain write committed after a newer run of its entry had started: the writer ran on
    # after its entry was handed over (a crash before the fenced commit repeats a plain
    # write too, but only from a run that started after the crashed one was gone).
    stale_plain = conn.execute(
        """
        SELECT p.entry_id, p.run_id, p.committed_at::text, n.id, n.started_at::text
        FROM chaos_plain_effects p
        JOIN chaos_runs r ON r.id = p.run_id
        JOIN LATERAL (SELECT n.id, n.started_at FROM chaos_runs n
                      WHERE n.entry_id = p.entry_id AND n.started_at > r.started_at
                        AND n.started_at < p.committed_at
                      ORDER BY n.started_at LIMIT 1) n ON true
        ORDER BY p.entry_id
        """
    ).fetchall()
    if stale_plain:
        violations.append(
            f"{len(stale_plain)} plain effects committed after a newer run of their entry "
            f"had started (entry, run, committed, newer run, its start), e.g. {stale_plain[:5]}"
        )
    plain_repeated = scalar(
        "SELECT count(*) FROM (SELECT entry_id FROM chaos_plain_effects GROUP BY entry_id "
        "HAVING count(*) > 1) AS repeated"
    )
    runs = chaos_overlaps.intervals(_runs(conn), _endings(conn))
    overlapping = chaos_overlaps.overlapping_pairs(runs)
    if overlapping:
        shown = [
            (
                first.run.entry_id,
                (first.run.run_id, first.run.pod, first.run.pid, str(first.run.started_at)),
                "never" if first.ended_at == chaos_overlaps.NEVER else str(first.ended_at),
                (second.run.run_id, second.run.pod, second.run.pid, str(second.run.started_at)),
            )
            for first, second in overlapping[:5]
        ]
        violations.append(
            f"{len(overlapping)} overlapping pairs of runs (entry, (run, pod, pid, start), "
            f"end, (run, pod, pid, start)), e.g. {shown}"
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
    frozen = _frozen_runs(conn, runs)
    gil_latencies = [
        float(value)
        for (value,) in conn.execute(
            """
            SELECT extract(epoch FROM (SELECT min(n.started_at) FROM chaos_runs n
                                       WHERE n.entry_id = h.entry_id AND n.id <> h.run_id
                                         AND n.started_at > h.fired_at) - h.fired_at)
            FROM chaos_gil_holds h WHERE h.fired_at IS NOT NULL
            """
        )
        if value is not None
    ]
    return Figures(
        seed=seed,
        entries=entries,
        processed=processed,
        runs=len(runs),
        faults=faults,
        faults_while_pending=faults_while_pending,
        mid_sweep_kills=mid_sweep_kills,
        latencies=latencies,
        killed_runs=len(latencies_rows),
        untraced_runs=sum(1 for run in runs if run.ended_at == chaos_overlaps.NEVER),
        fence_lost=scalar("SELECT count(*) FROM chaos_runs WHERE outcome = 'FenceLost'"),
        self_fenced=scalar("SELECT count(*) FROM chaos_fences"),
        seconds=seconds,
        violations=violations,
        overlaps=len(overlapping),
        plain_repeated=plain_repeated,
        frozen_runs=frozen.caught,
        frozen_runs_finished_late=frozen.finished_late,
        freeze_latencies=frozen.latencies,
        gil_latencies=gil_latencies,
        frozen_deaths=scalar("SELECT count(*) FROM chaos_deaths"),
    )


@dataclasses.dataclass(frozen=True)
class _Frozen:
    caught: int
    finished_late: int
    latencies: list[float]


def _frozen_runs(conn: psycopg.Connection[Any], runs: Sequence[chaos_overlaps.Interval]) -> _Frozen:
    """The runs each freeze caught mid-body (on the frozen Pod, started before the freeze,
    ended after it), how many wrote their own end after the thaw, and freeze -> the
    caught entry's next run elsewhere."""
    by_pod: dict[str, list[chaos_overlaps.Interval]] = collections.defaultdict(list)
    by_entry: dict[int, list[datetime.datetime]] = collections.defaultdict(list)
    for interval in runs:
        by_pod[interval.run.pod].append(interval)
        by_entry[interval.run.entry_id].append(interval.run.started_at)
    caught, finished_late, latencies = 0, 0, []
    for pod, frozen_at, thawed_at in conn.execute(
        "SELECT pod, frozen_at, thawed_at FROM chaos_freezes ORDER BY frozen_at"
    ):
        for interval in by_pod[pod]:
            if not interval.run.started_at < frozen_at < interval.ended_at:
                continue
            caught += 1
            finished = interval.run.finished_at
            finished_late += finished is not None and finished > thawed_at
            later = [at for at in by_entry[interval.run.entry_id] if at > frozen_at]
            if later:
                latencies.append((min(later) - frozen_at).total_seconds())
    return _Frozen(caught=caught, finished_late=finished_late, latencies=latencies)


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


@dataclasses.dataclass(frozen=True)
class _Process:
    """A process of a worker container: its host PID, its PID in the container (what its
    bodies record), and its start (so a reused PID is not taken for it)."""

    host_pid: int
    pid: int
    start_ticks: int

    @classmethod
    def read(cls, host_pid: int) -> _Process | None:
        try:
            stat = Path(f"/proc/{host_pid}/stat").read_text()
            status = Path(f"/proc/{host_pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        namespaced = next(
            (line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:")),
            str(host_pid),
        )
        return cls(host_pid=host_pid, pid=int(namespaced), start_ticks=_start_ticks(stat))

    def alive(self) -> bool:
        """Still running code (stopped counts): not gone, not reused, not a zombie."""
        try:
            stat = Path(f"/proc/{self.host_pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return _start_ticks(stat) == self.start_ticks and _running(self.host_pid)


def _start_ticks(stat: str) -> int:
    return int(stat.rsplit(")", 1)[1].split()[19])


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def _freeze_tree(main_pid: int) -> list[_Process]:
    """SIGSTOP ``main_pid`` and then every process below it (celery's pool, the guardian):
    the parent first, so no new child appears behind the sweep."""
    frozen: dict[int, _Process] = {}
    frontier = [main_pid]
    while frontier:
        host_pid = frontier.pop()
        if host_pid in frozen:
            continue
        process = _Process.read(host_pid)
        if process is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(host_pid, signal.SIGSTOP)
            frozen[host_pid] = process
            frontier += sorted(_children(host_pid))
    return list(frozen.values())


class _DeathWatch:
    """Notes when each process of a worker Pod is gone — by its own watchdog, the guardian,
    the kubelet (a liveness kill, a freeze's end) or a driver's kill: the end of a run it
    held that never wrote its own. One thread polls the Pods' cgroups (``start``) and every
    process found there or handed over by a freeze (``watch``)."""

    def __init__(self, *, stopping: threading.Event, failures: list[str]) -> None:
        self.stopping = stopping
        self.failures = failures
        self.lock = threading.Lock()
        self.watched: list[tuple[str, _Process]] = []
        self.deaths: list[tuple[str, int, datetime.datetime]] = []
        self.thread: threading.Thread | None = None
        self.pods: dict[str, str] = {}  # Pod name -> uid
        self.cgroups: dict[str, Path] = {}
        self.pids_root: Path | None = None

    def start(self, *, pods: dict[str, str], cgroup_root: str) -> None:
        self.pods = dict(pods)
        self.pids_root = node.CGROUP_FS / "pids" / cgroup_root.lstrip("/")
        self.watch("", [])

    def watch(self, pod: str, processes_: Sequence[_Process]) -> None:
        with self.lock:
            self.watched += [(pod, process) for process in processes_]
            if self.thread is None:
                self.thread = threading.Thread(target=self._poll, name="chaos-deaths", daemon=True)
                self.thread.start()

    def _pod_processes(self) -> list[tuple[str, int]]:
        found = []
        for name, uid in self.pods.items():
            cgroup = self.cgroups.get(name)
            if cgroup is None and self.pids_root is not None:
                for spelling in (uid, uid.replace("-", "_")):
                    cgroup = next(self.pids_root.rglob(f"*pod{spelling}*"), None)
                    if cgroup is not None:
                        self.cgroups[name] = cgroup
                        break
            if cgroup is None:
                continue
            try:
                for procs in cgroup.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError, ValueError):
                        found += [(name, int(pid)) for pid in procs.read_text().split()]
            except OSError:
                # A container's cgroup went away during the walk (a kill, a restart): its
                # processes are watched already or show at the next poll, 0.1 s later.
                continue
        return found

    def _track_new(self) -> None:
        with self.lock:
            known = {process.host_pid for _, process in self.watched}
        new = []
        for pod, host_pid in self._pod_processes():
            if host_pid not in known:
                process = _Process.read(host_pid)
                if process is not None:
                    new.append((pod, process))
        if new:
            with self.lock:
                self.watched += new

    def recorded(self) -> list[tuple[str, int, datetime.datetime]]:
        with self.lock:
            return list(self.deaths)

    def _poll(self) -> None:
        try:
            self._poll_until_stopped()
        except Exception as error:  # deaths no longer dated: the verdict would be wrong
            self.failures.append(
                f"watching worker processes failed: {type(error).__name__}: {error}"
            )
            self.stopping.set()

    def _poll_until_stopped(self) -> None:
        while not self.stopping.wait(DEATH_POLL_SECONDS):
            self._track_new()
            with self.lock:
                watched = list(self.watched)
            gone = [(pod, process) for pod, process in watched if not process.alive()]
            if not gone:
                continue
            # Noted once seen gone: no earlier than the death itself.
            at = datetime.datetime.now(datetime.UTC)
            with self.lock:
                self.watched = [item for item in self.watched if item not in gone]
                self.deaths += [(pod, process.pid, at) for pod, process in gone]


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
        "--faults-per-kind",
        type=int,
        default=DEFAULT_FAULTS_PER_KIND,
        help=f"faults of each kind ({DEFAULT_FAULTS_PER_KIND})",
    )
    parser.add_argument("--workers", type=int, default=3, help="worker Pods (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per Pod (2)")
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=Settings.heartbeat_timeout_seconds,
        help="the workers' heartbeat timeout in seconds, which sizes freezes and GIL holds (20)",
    )
    parser.add_argument(
        "--long-faults-per-kind",
        type=int,
        help="worker freezes and GIL holds each (default: a fifth of --faults-per-kind)",
    )
    args = parser.parse_args(argv)
    settings = Settings(
        seed=args.seed if args.seed is not None else new_seed(),
        entries=args.entries,
        faults_per_kind=args.faults_per_kind,
        workers=args.workers,
        concurrency=args.concurrency,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        long_faults_per_kind=args.long_faults_per_kind,
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
