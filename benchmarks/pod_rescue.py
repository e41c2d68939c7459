"""Pod rescue latency: from the SIGKILL of a real worker Pod's container to the re-run body.

What a user waits for when a worker container dies is the moment its entries *run again*
elsewhere — not a call into our code. So nothing here calls ``reconcile.rescue``: on a stack
of its own (PostgreSQL, Redis, kube-apiserver + etcd, and the test bed's node — kubelet,
containerd, runc — running the image built from the Dockerfile) the real operator (a local
process, as the e2e tests run it) watches ``--workers`` demo worker Pods of the image, in
its policy's selector, with the chart's liveness probe and the default heartbeat timeout.

``--kills`` times (default 50): a few entries whose first run holds its body for minutes
(``hold_before_commit``, one-shot: a re-run is ordinary) are dispatched; every Pod running
one has **all the processes of its container SIGKILLed from the host** (found through its
cgroup), with free slots on the others. Latency, per held entry: the start of its next body
run (the body's own ``task_runs`` row, PostgreSQL's clock) minus the kill. The kill is taken
on this host's clock just before the first signal and moved onto the database's clock by an
offset measured before the kills (PostgreSQL runs on this host, so both are the same kernel
clock: the offset is printed with its error bound, half the tightest round trip).

Per kill it reads how the holder's process was ended: **by proof** (a Pod's container
ending — the kubelet's report through the operator's pod watch — or the guardian's record,
before the holder's heartbeat was even stale) or **by the heartbeat path** (ended only after
its heartbeat went stale: the silence rule, or the silent-worker check finding the proof
late), and prints the share rescued by proof (the goal is all of them). It breaks each
rescue into its stages (the kubelet's report, the operator ending the process, the
re-dispatch, the body's start) and prints, as a baseline that runs no code of ours, the
kubelet's own report latency: from the kill to a plain kubernetes watch (the client
library, nothing of ours) seeing the Pod status report that container instance ended —
and our latency's ratio to it.

``--freezes`` times (default 3): the same, but every process of the container is stopped
(SIGSTOP) instead; the liveness probe fails once the guardian's tick is older than the
heartbeat timeout, the kubelet kills and restarts the container, and its report moves the
work. It prints freeze -> the kubelet's report and freeze -> re-run body start beside the
bound the code states for the kill (heartbeat timeout + failureThreshold x periodSeconds +
timeoutSeconds + the Pod's grace period: ``celery_reconciler_worker.probe``), computed from
the ledger's heartbeat timeout and the Pod spec the run used.

Timings are printed, never asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import kubernetes
import psycopg

from benchmarks.rescue import percentile
from celery_app.demo import schema
from celery_reconciler import policy_annotations
from devstack import chaos, demo_policy, operators, processes, workers
from devstack import redis as devstack_redis

NAMESPACE = "bench-pod-rescue"
# A first run that holds its body this long is killed long before it ends.
HOLD_SECONDS = 600.0
# How long a rescue may take before the benchmark counts it "not re-run" and moves on: well
# past the heartbeat path (the default timeout is 20 s), well short of the 10-minute lease.
RERUN_WAIT_SECONDS = 90.0

# How a holder's process was ended, read from its incarnation row (``rescue_path``).
PROOF = "proof"  # ended by a proof before its heartbeat could be judged stale
# Ended by a proof only once its heartbeat was stale: the silent-worker check read the Pod's
# proof, or — always, for a frozen container, whose kill waits for the stale heartbeat — the
# pod event came after it.
AFTER_SILENCE = "proof after the heartbeat went stale"
SILENCE = "silence"  # the no-heartbeat rule (workers without a Pod identity)
NOT_ENDED = "not ended"  # nothing ended it: only its lease could move its entries
PATHS = (PROOF, AFTER_SILENCE, SILENCE, NOT_ENDED)
SILENCE_REASON_PREFIX = "no heartbeat for "


# --- pure parts ---------------------------------------------------------------------------


def rescue_path(
    *,
    ended_at: datetime.datetime | None,
    ended_reason: str | None,
    heartbeat_at: datetime.datetime,
    heartbeat_timeout_seconds: float,
) -> str:
    """How an incarnation that held a killed body was ended, from its ledger row.

    The silence rule and the silent-worker check both act only once ``heartbeat_at`` is
    older than the timeout, so an ending sooner than that came from a proof that did not
    wait for silence: a pod event (the kubelet's report) or the guardian's record."""
    if ended_at is None:
        return NOT_ENDED
    if (ended_reason or "").startswith(SILENCE_REASON_PREFIX):
        return SILENCE
    if (ended_at - heartbeat_at).total_seconds() < heartbeat_timeout_seconds:
        return PROOF
    return AFTER_SILENCE


def slowest_path(paths: Iterable[str]) -> str:
    """A kill is rescued by proof only if every process that held its bodies was."""
    return max(paths, key=PATHS.index, default=NOT_ENDED)


def ended_container_ids(pod: Mapping[str, Any]) -> set[str]:
    """The container instances a Pod's status reports ended (``containerID`` of
    ``state.terminated`` or ``lastState.terminated``), as a plain watch sees it."""
    ended = set()
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        for key in ("state", "lastState"):
            terminated = (status.get(key) or {}).get("terminated") or {}
            if terminated.get("containerID"):
                ended.add(str(terminated["containerID"]))
    return ended


def probe_kill_bound_seconds(
    *, heartbeat_timeout_seconds: float, probe: Mapping[str, Any], grace_seconds: float
) -> float:
    """When the kubelet's kill of a frozen container lands at the latest, from the freeze:
    the bound ``celery_reconciler_worker.probe`` states. The probe fails once the ticks are
    older than the heartbeat timeout; the kubelet kills after ``failureThreshold`` failures
    ``periodSeconds`` apart (+ ``timeoutSeconds`` for an exec that hangs), and a frozen
    process never acts on SIGTERM, so the kill waits out the grace period. Kubernetes'
    defaults apply to fields the probe leaves out."""
    return (
        heartbeat_timeout_seconds
        + int(probe.get("failureThreshold", 3)) * int(probe.get("periodSeconds", 10))
        + int(probe.get("timeoutSeconds", 1))
        + grace_seconds
    )


@dataclasses.dataclass(frozen=True)
class ClockOffset:
    """The database's clock minus this host's, and the most it may be off by."""

    seconds: float
    error_seconds: float


def clock_offset(samples: Iterable[tuple[float, datetime.datetime, float]]) -> ClockOffset:
    """From (host time before, database time, host time after) readings: the tightest one,
    taking the database's reading to fall in the middle of its round trip."""
    before, database, after = min(samples, key=lambda sample: sample[2] - sample[0])
    return ClockOffset(
        seconds=database.timestamp() - (before + after) / 2, error_seconds=(after - before) / 2
    )


def spread(values: Sequence[float]) -> str:
    if not values:
        return "none"
    return (
        f"p50 {percentile(values, 0.5):6.2f} s   p90 {percentile(values, 0.9):6.2f} s   "
        f"p99 {percentile(values, 0.99):6.2f} s   max {max(values):6.2f} s   (n={len(values)})"
    )


# --- the run ------------------------------------------------------------------------------


class PodReports:
    """A plain watch of the namespace's Pods (the kubernetes client library, no code of
    ours): when a report that a container instance ended first arrived, on this host's clock."""

    def __init__(self, *, kubeconfig: Path, namespace: str) -> None:
        self._api = kubernetes.client.CoreV1Api(
            kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        )
        self._namespace = namespace
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-reports", daemon=True)

    def __enter__(self) -> PodReports:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=70)

    def ended_at(self, container_id: str) -> float | None:
        with self._lock:
            return self._ended.get(container_id)

    def _run(self) -> None:
        resource_version: str | None = None
        while not self._stopping.is_set():
            watch = kubernetes.watch.Watch()
            try:
                for event in watch.stream(
                    self._api.list_namespaced_pod,
                    self._namespace,
                    resource_version=resource_version,
                    timeout_seconds=10,
                ):
                    seen = time.time()
                    with self._lock:
                        for container_id in ended_container_ids(event["raw_object"]):
                            self._ended.setdefault(container_id, seen)
                    if self._stopping.is_set():
                        return
                resource_version = watch.resource_version
            except kubernetes.client.ApiException as error:
                if error.status == 410:  # expired: list again (setdefault keeps first sightings)
                    resource_version = None
                time.sleep(0.2)
            except Exception:  # a broken stream: watch again from where it was
                time.sleep(0.2)


@dataclasses.dataclass(frozen=True)
class Holder:
    """An entry's running attempt at the kill: its process's incarnation, and its Pod."""

    entry_id: str
    incarnation: str
    pod: str


@dataclasses.dataclass(frozen=True)
class Kill:
    """One container killed (SIGKILL) or frozen (SIGSTOP), and the entries it held."""

    pod: str
    container_id: str
    at_host: float  # this host's clock, just before the first signal
    at: datetime.datetime  # the same moment on the database's clock
    held: tuple[Holder, ...]


@dataclasses.dataclass(frozen=True)
class Rescue:
    """What one kill led to, every time on the database's clock."""

    kill: Kill
    reruns: dict[str, datetime.datetime]  # entry -> its next body start
    dispatched: dict[str, datetime.datetime]  # entry -> its re-dispatch
    reported_at: datetime.datetime | None  # the kubelet's report, seen by a plain watch
    ended_at: datetime.datetime | None  # the last holder's incarnation ended
    path: str
    heartbeat_timeout_seconds: float

    def latencies(self) -> list[float]:
        return [(at - self.kill.at).total_seconds() for at in self.reruns.values()]

    def not_rerun(self) -> int:
        return len(self.kill.held) - len(self.reruns)


class Bench:
    def __init__(self, *, stack: chaos.Stack, broker_url: str, dsn: str, args: Any) -> None:
        self.stack = stack
        self.broker_url = broker_url
        self.dsn = dsn
        self.args = args
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.pods: list[workers.WorkerPod] = []
        self.offset = ClockOffset(0.0, 0.0)
        self.struck = 0  # containers the benchmark killed or froze
        self.restarts_before = 0  # restarts of the Pods replaced since

    def close(self) -> None:
        self.conn.close()

    def start_workers(self, *, liveness_probe: bool) -> None:
        """The worker Pods (again, replacing any from before: the freeze phase needs the
        probe the kill phase may run without)."""
        for pod in self.pods:
            self.restarts_before += pod.restart_count()
            pod.delete(grace_seconds=1, wait=True)
        self.pods = [
            workers.start_worker_pod(
                node=self.stack.node,
                namespace=NAMESPACE,
                pod_name=f"insights-worker-{number}",
                labels=demo_policy.WORKER_LABELS,
                broker_url=self.broker_url,
                dsn=self.dsn,
                concurrency=self.args.concurrency,
                wait=False,
                liveness_probe=liveness_probe,
            )
            for number in range(self.args.workers)
        ]
        for pod in self.pods:
            pod.wait_ready(restarts=None, timeout_seconds=300)

    def measure_clock_offset(self) -> None:
        samples = []
        for _ in range(50):
            before = time.time()
            row = self.conn.execute("SELECT clock_timestamp()").fetchone()
            after = time.time()
            assert row is not None
            samples.append((before, row[0], after))
        self.offset = clock_offset(samples)

    def on_database_clock(self, host_seconds: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(host_seconds + self.offset.seconds, datetime.UTC)

    def hold_entries(self, count: int) -> list[str]:
        """New entries whose first run holds its body; one statement, so no sweep sees an
        entry before its fault."""
        rows = self.conn.execute(
            """
            WITH new AS (
                INSERT INTO journal_entry ("user", body)
                SELECT 'bench', 'A calm and happy evening.' FROM generate_series(1, %s)
                RETURNING id)
            INSERT INTO demo_faults (entry_id, kind, seconds)
            SELECT id, 'hold_before_commit', %s FROM new RETURNING entry_id
            """,
            [count, HOLD_SECONDS],
        ).fetchall()
        self.stack.plane.kubectl(
            "-n", NAMESPACE, "annotate", "--overwrite", "processingpolicy",
            demo_policy.POLICY_NAME, f"{policy_annotations.SWEEP_NOW}={uuid.uuid4().hex}",
        )  # fmt: skip
        return [str(row[0]) for row in rows]

    def holders(self, entry_ids: Sequence[str]) -> list[Holder]:
        """The running attempts of these entries whose body has started, with their Pods."""
        rows = self.conn.execute(
            """
            SELECT e.entry_id, e.incarnation::text, i.pod_name
            FROM celery_reconciler.entries e
            JOIN celery_reconciler.incarnations i ON i.id = e.incarnation
            WHERE e.entry_id = ANY(%s::text[]) AND e.state = 'running'
              AND EXISTS (SELECT 1 FROM task_runs r WHERE r.entry_id::text = e.entry_id)
            """,
            [list(entry_ids)],
        ).fetchall()
        return [Holder(entry_id=row[0], incarnation=row[1], pod=row[2]) for row in rows]

    def wait_until_held(self, entry_ids: Sequence[str]) -> list[Holder] | None:
        """The holders once every entry runs its first body; ``None`` when an entry ran
        again before that (its first run's container was restarted by something else — the
        liveness probe of a worker starved on a loaded node): the round is disturbed."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = self.holders(entry_ids)
            if len(held) == len(entry_ids):
                return held
            again = self.conn.execute(
                "SELECT EXISTS (SELECT 1 FROM task_runs WHERE entry_id::text = ANY(%s) "
                "GROUP BY entry_id HAVING count(*) > 1)",
                [list(entry_ids)],
            ).fetchone()
            if again == (True,):
                return None
            time.sleep(0.1)
        return None

    def restarts_not_ours(self) -> int:
        """Container restarts the benchmark did not cause (the liveness probe's, on a node
        too loaded to run the probe within its timeout)."""
        return self.restarts_before + sum(pod.restart_count() for pod in self.pods) - self.struck

    def strike(self, held: Sequence[Holder], *, signal_number: int) -> list[Kill]:
        """Signal every process of each container that holds one of ``held``."""
        by_pod = {pod.name: pod for pod in self.pods}
        targets = []
        for name in sorted({holder.pod for holder in held}):
            pod = by_pod[name]
            container_id = str(pod.container_status()["containerID"])
            targets.append((pod, container_id, pod.container_pids()))
        kills = []
        for pod, container_id, pids in targets:
            at_host = time.time()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal_number)
            self.struck += 1
            kills.append(
                Kill(
                    pod=pod.name,
                    container_id=container_id,
                    at_host=at_host,
                    at=self.on_database_clock(at_host),
                    held=tuple(holder for holder in held if holder.pod == pod.name),
                )
            )
        return kills

    def reruns(self, kill: Kill) -> dict[str, datetime.datetime]:
        rows = self.conn.execute(
            "SELECT entry_id::text, min(started_at) FROM task_runs "
            "WHERE entry_id::text = ANY(%s) AND started_at > %s GROUP BY entry_id",
            [[holder.entry_id for holder in kill.held], kill.at],
        ).fetchall()
        return {row[0]: row[1] for row in rows}

    def wait_for_reruns(self, kills: Sequence[Kill], *, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if all(len(self.reruns(kill)) == len(kill.held) for kill in kills):
                return
            time.sleep(0.25)

    def account(self, kill: Kill, *, reports: PodReports) -> Rescue:
        """Read what a kill led to from the ledger, the body's rows and the plain watch."""
        reruns = self.reruns(kill)
        dispatched: dict[str, datetime.datetime] = dict(
            self.conn.execute(
                "SELECT entry_id, dispatched_at FROM celery_reconciler.entries "
                "WHERE entry_id = ANY(%s::text[])",
                [list(reruns)],
            ).fetchall()
        )
        rows = self.conn.execute(
            "SELECT ended_at, ended_reason, heartbeat_at, heartbeat_timeout_seconds "
            "FROM celery_reconciler.incarnations WHERE id = ANY(%s::uuid[])",
            [sorted({holder.incarnation for holder in kill.held})],
        ).fetchall()
        paths = [
            rescue_path(
                ended_at=ended_at,
                ended_reason=reason,
                heartbeat_at=heartbeat_at,
                heartbeat_timeout_seconds=timeout,
            )
            for ended_at, reason, heartbeat_at, timeout in rows
        ]
        ends = [row[0] for row in rows]
        reported = reports.ended_at(kill.container_id)
        return Rescue(
            kill=kill,
            reruns=reruns,
            dispatched=dispatched,
            reported_at=None if reported is None else self.on_database_clock(reported),
            ended_at=None if None in ends or not ends else max(ends),
            path=slowest_path(paths),
            heartbeat_timeout_seconds=max((row[3] for row in rows), default=0.0),
        )

    def wait_for_the_ledger(self) -> None:
        """The operator's first sweep creates the ledger's tables the benchmark reads."""
        processes.wait_for(
            lambda: (
                self.conn.execute(
                    "SELECT to_regclass('celery_reconciler.entries') IS NOT NULL"
                ).fetchone()
                == (True,)
            ),
            timeout_seconds=120,
            what="the operator's first sweep to create the ledger",
        )

    def wait_until_done(self, entry_ids: Sequence[str], *, timeout_seconds: float) -> None:
        """Until the re-runs have finished, so their slots are free for the next round; an
        entry never re-run is left to its lease (and shows as not re-run in the figures)."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            row = self.conn.execute(
                "SELECT count(*) FROM journal_entry WHERE id::text = ANY(%s) "
                "AND NOT insights_extracted",
                [list(entry_ids)],
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.25)

    def wait_until_restarted(self, kills: Sequence[Kill], *, timeout_seconds: float) -> None:
        """Every struck Pod runs a new container instance, ready to take work again."""
        by_pod = {pod.name: pod for pod in self.pods}
        for kill in kills:
            pod = by_pod[kill.pod]

            def restarted(pod: workers.WorkerPod = pod, kill: Kill = kill) -> dict[str, Any]:
                status = pod.container_status()
                new = status.get("containerID") not in (None, kill.container_id)
                return status if new and "running" in status.get("state", {}) else {}

            processes.wait_for(
                restarted, timeout_seconds=timeout_seconds, what=f"{kill.pod} to run again"
            )
            pod.wait_ready(restarts=None, timeout_seconds=timeout_seconds)

    def round(
        self, *, signal_number: int, reports: PodReports, wait_seconds: float
    ) -> list[Rescue] | None:
        """One round: held bodies dispatched, their containers struck, the rescue read;
        ``None`` when something else restarted a holder first (nothing was measured)."""
        for pod in self.pods:
            pod.wait_ready(restarts=None, timeout_seconds=wait_seconds)
        entry_ids = self.hold_entries(self.args.bodies_per_kill)
        held = self.wait_until_held(entry_ids)
        if held is None:
            self.wait_until_done(entry_ids, timeout_seconds=60)
            return None
        kills = self.strike(held, signal_number=signal_number)
        self.wait_for_reruns(kills, timeout_seconds=wait_seconds)
        self.wait_until_done(entry_ids, timeout_seconds=30)
        self.wait_until_restarted(kills, timeout_seconds=wait_seconds)
        time.sleep(0.5)  # the watch's report of the restart, if it is late
        return [self.account(kill, reports=reports) for kill in kills]

    def pod_spec(self, name: str) -> dict[str, Any]:
        got = self.stack.plane.kubectl("-n", NAMESPACE, "get", "pod", name, "-o", "json")
        spec: dict[str, Any] = json.loads(got.stdout)["spec"]
        return spec


# --- report -------------------------------------------------------------------------------


def stages(rescues: Sequence[Rescue]) -> dict[str, list[float]]:
    """Where each re-run's time went, stage by stage (seconds, the database's clock)."""
    found: dict[str, list[float]] = {
        "kill -> the kubelet's report (plain watch)": [],
        "report -> the operator ended the process": [],
        "ended -> re-dispatched": [],
        "re-dispatched -> body started": [],
    }
    names = list(found)
    for rescue in rescues:
        if rescue.reported_at is not None:
            found[names[0]].append((rescue.reported_at - rescue.kill.at).total_seconds())
            if rescue.ended_at is not None:
                found[names[1]].append((rescue.ended_at - rescue.reported_at).total_seconds())
        for entry_id, started in rescue.reruns.items():
            dispatched = rescue.dispatched.get(entry_id)
            if dispatched is None:
                continue
            if rescue.ended_at is not None:
                found[names[2]].append((dispatched - rescue.ended_at).total_seconds())
            found[names[3]].append((started - dispatched).total_seconds())
    return found


def progress(rescue: Rescue, *, number: int) -> str:
    """One line per struck container, as the run goes (the summary follows at the end)."""
    report = (
        "none"
        if rescue.reported_at is None
        else f"{(rescue.reported_at - rescue.kill.at).total_seconds():.2f} s"
    )
    reruns = ", ".join(f"{latency:.2f} s" for latency in rescue.latencies()) or "none"
    return (
        f"  #{number} {rescue.kill.pod}: re-run after {reruns}; the kubelet's report after "
        f"{report}; {rescue.path}"
    )


def describe(rescues: Sequence[Rescue], *, what: str) -> list[str]:
    ours = [latency for rescue in rescues for latency in rescue.latencies()]
    kubelet = [
        (rescue.reported_at - rescue.kill.at).total_seconds()
        for rescue in rescues
        if rescue.reported_at is not None
    ]
    by_path = {path: sum(rescue.path == path for rescue in rescues) for path in PATHS}
    lines = [
        f"  {what} -> re-run body start (per held entry):  {spread(ours)}",
        f"  baseline, {what} -> the kubelet's report seen by a plain watch:  {spread(kubelet)}",
    ]
    if ours and kubelet:
        lines.append(
            f"  ours / the kubelet's report: p50 "
            f"{percentile(ours, 0.5) / percentile(kubelet, 0.5):.2f}x, p99 "
            f"{percentile(ours, 0.99) / percentile(kubelet, 0.99):.2f}x"
        )
    lines.append(
        f"  rescued by proof before the heartbeat went stale: {by_path[PROOF]} of "
        f"{len(rescues)} containers "
        f"({100 * by_path[PROOF] / max(1, len(rescues)):.0f}%); "
        + ", ".join(f"{path}: {count}" for path, count in by_path.items() if path != PROOF)
        + f"; held entries not re-run within the wait: "
        f"{sum(rescue.not_rerun() for rescue in rescues)}"
    )
    lines += [f"    {name:<46} {spread(values)}" for name, values in stages(rescues).items()]
    return lines


def run(stack: chaos.Stack, args: argparse.Namespace) -> None:
    broker = devstack_redis.start(stack.workdir)
    operator: operators.OperatorProcess | None = None
    bench: Bench | None = None
    try:
        plane = stack.plane
        plane.install_crds()
        plane.kubectl("create", "namespace", NAMESPACE)
        dsn = stack.postgres.create_database("bench_pod_rescue")
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.create_schema(conn)
        bench = Bench(stack=stack, broker_url=broker.url, dsn=dsn, args=args)
        bench.start_workers(liveness_probe=not args.no_probe_while_killing)
        operator = operators.start(
            plane, log_dir=stack.workdir, namespaces=(NAMESPACE,), verbose=False
        )
        demo_policy.apply_policy(
            plane, NAMESPACE, dsn=dsn, broker_url=broker.url, lease_timeout="10m",
            sweep_interval="30s",
        )  # fmt: skip
        bench.wait_for_the_ledger()
        bench.measure_clock_offset()
        print(
            f"pod rescue: {args.workers} worker Pods x {args.concurrency} processes on the test "
            f"bed's node, {args.bodies_per_kill} held bodies per kill; host -> database clock "
            f"offset {bench.offset.seconds * 1000:+.2f} ms +/- "
            f"{bench.offset.error_seconds * 1000:.2f} ms; load average "
            f"{os.getloadavg()[0]:.2f}",
            flush=True,
        )
        with PodReports(kubeconfig=plane.kubeconfig, namespace=NAMESPACE) as reports:
            killed: list[Rescue] = []
            disturbed = 0
            while len(killed) < args.kills:
                rescues = bench.round(
                    signal_number=signal.SIGKILL, reports=reports, wait_seconds=RERUN_WAIT_SECONDS
                )
                if rescues is None:
                    disturbed += 1
                    print("  (a holder restarted before the kill: round not counted)", flush=True)
                    continue
                for rescue in rescues:
                    killed.append(rescue)
                    print(progress(rescue, number=len(killed)), flush=True)
            print(
                f"SIGKILL of every process of a worker container, {len(killed)} kills"
                + (" (worker Pods without a liveness probe)" * args.no_probe_while_killing)
                + ":"
            )
            for line in describe(killed, what="kill"):
                print(line, flush=True)
            frozen: list[Rescue] = []
            if args.no_probe_while_killing:
                bench.start_workers(liveness_probe=True)
            bound = 0.0
            while len(frozen) < args.freezes:
                spec = bench.pod_spec(bench.pods[0].name)
                rescues = bench.round(
                    signal_number=signal.SIGSTOP, reports=reports, wait_seconds=300
                )
                if rescues is None:
                    disturbed += 1
                    print("  (a holder restarted before the freeze: round not counted)", flush=True)
                    continue
                timeout = max(rescue.heartbeat_timeout_seconds for rescue in rescues)
                bound = probe_kill_bound_seconds(
                    heartbeat_timeout_seconds=timeout,
                    probe=spec["containers"][0].get("livenessProbe", {}),
                    grace_seconds=float(spec.get("terminationGracePeriodSeconds", 30)),
                )
                for rescue in rescues:
                    frozen.append(rescue)
                    print(progress(rescue, number=len(frozen)), flush=True)
            probe = bench.pod_spec(bench.pods[0].name)["containers"][0].get("livenessProbe", {})
            print(
                f"SIGSTOP of every process of a worker container (frozen), {len(frozen)} "
                f"freezes; the kubelet's kill is bound at {bound:.0f} s after the freeze "
                f"(heartbeat timeout + failureThreshold {probe.get('failureThreshold')} x "
                f"periodSeconds {probe.get('periodSeconds')} + timeoutSeconds "
                f"{probe.get('timeoutSeconds')} + the Pod's grace period):"
            )
            for line in describe(frozen, what="freeze"):
                print(line, flush=True)
            print(
                f"rounds not counted (a holder restarted before the strike): {disturbed}; "
                f"container restarts the benchmark did not cause (liveness probe): "
                f"{bench.restarts_not_ours()}; load average at "
                f"the end {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    finally:
        if operator is not None:
            operator.stop()
        if bench is not None:
            for pod in bench.pods:
                pod.delete(grace_seconds=1, wait=True)
            bench.close()
        broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pod_rescue", description=__doc__)
    parser.add_argument("--kills", type=int, default=50, help="containers SIGKILLed (50)")
    parser.add_argument("--freezes", type=int, default=3, help="containers frozen (3)")
    parser.add_argument("--workers", type=int, default=3, help="worker Pods (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per Pod (2)")
    parser.add_argument(
        "--bodies-per-kill", type=int, default=2, help="held bodies dispatched per round (2)"
    )
    parser.add_argument(
        "--no-probe-while-killing",
        action="store_true",
        help="the SIGKILL phase's worker Pods carry no liveness probe (the freeze phase's "
        "always do): on a node too loaded to run the exec probe within its timeout, the "
        "kubelet restarts healthy workers and disturbs every round",
    )
    args = parser.parse_args(argv)
    if args.bodies_per_kill >= (args.workers - 1) * args.concurrency:
        parser.error("--bodies-per-kill must leave free slots on the Pods that are not killed")
    workdir = Path(tempfile.mkdtemp(prefix="cr-bench-pod-rescue-"))
    print(f"starting PostgreSQL, Redis, kube-apiserver and a node (logs in {workdir})", flush=True)
    with chaos.own_stack(workdir) as stack:
        run(stack, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
