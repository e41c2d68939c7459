"""A worker Pod's entries move when the kubelet proves its process gone, exactly and at once.

Issue 21, on the real stack and the test bed's real node (kubelet + containerd + runc
running the image). Workers get a heartbeat timeout of 10 minutes and the lease is 10
minutes, so within these tests no entry can move by silence or lease: every re-run was
dispatched by a pod event, and the ledger's ``ended_reason`` of each ended incarnation says
which. Every verdict about double runs comes from the bodies' own start/end rows on one
PostgreSQL clock (``celery_app.demo.audit``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from e2e_support import (
    OperatorProcess,
    apply_policy,
    get_json,
    ledger_rows,
    seed,
    tally,
    unprocessed,
    wait_for,
)

from celery_app.demo import audit, schema
from devstack import kube as devstack_kube
from devstack import processes, tcp_proxy, workers

pytestmark = pytest.mark.e2e

LEASE = "10m"
SWEEP_INTERVAL = "1h"  # the first sweep dispatches; no later sweep runs within a test
# Silence cannot move anything within a test: only a pod event can.
NO_SILENCE = {"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": "600"}
SILENCE_SECONDS = 4.0
QUICK_SILENCE = {"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(SILENCE_SECONDS)}
# What a pod event writes as the ending of an incarnation whose container instance ended.
PROOF = "its container worker's instance "


def hang_all(dsn: str, count: int) -> None:
    seed(dsn, count)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for entry_id in range(1, count + 1):
            schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=600)


def clear_faults(dsn: str, entry_ids: Sequence[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM demo_faults WHERE entry_id = ANY(%s)", [list(entry_ids)])


def running_on(dsn: str, worker: str) -> list[int]:
    return [int(row[0]) for row in ledger_rows(dsn, state="running", worker=worker)]


def runs(dsn: str) -> list[audit.Run]:
    with psycopg.connect(dsn) as conn:
        return audit.runs(conn)


def database_now(dsn: str) -> datetime.datetime:
    with psycopg.connect(dsn) as conn:
        return audit.database_now(conn)


def unfinished_since(dsn: str, *, worker: str, since: datetime.datetime) -> list[int]:
    return sorted(
        run.entry_id
        for run in runs(dsn)
        if run.worker == worker and run.finished_at is None and run.started_at > since
    )


def incarnations(dsn: str, *, pod: str) -> list[tuple[Any, ...]]:
    """(started_at, ended_reason) of every incarnation of a pod, oldest first."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT started_at, ended_reason FROM celery_reconciler.incarnations "
            "WHERE pod_name = %s ORDER BY started_at",
            [pod],
        ).fetchall()


def lost_attempts(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT entry_id, worker, error FROM celery_reconciler.attempts "
            "WHERE outcome = 'lost' ORDER BY entry_id, attempt"
        ).fetchall()


def overlaps(dsn: str, *, kills: dict[str, list[datetime.datetime]]) -> list[Any]:
    """Overlapping runs, a killed body ending at the first kill of its worker after it
    started (a worker Pod killed twice has two generations of unfinished bodies)."""
    ended = []
    for run in runs(dsn):
        if run.finished_at is None:
            after = [at for at in kills.get(run.worker, []) if at > run.started_at]
            if after:
                run = dataclasses.replace(run, finished_at=min(after))
        ended.append(run)
    return audit.overlapping_runs(ended)


@dataclasses.dataclass(frozen=True)
class Dispatched:
    operator: OperatorProcess
    held: dict[str, list[int]]  # by worker Pod: the entries its bodies run


@pytest.fixture
def dispatch(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> Callable[..., Dispatched]:
    """``dispatch(holders={pod: n})``: what every test here starts with — an operator, the
    policy (long leases, one sweep), and each named worker Pod running ``n`` bodies."""

    def start(
        *,
        holders: dict[str, int],
        sweep_interval: str = SWEEP_INTERVAL,
        kubeconfig: Path | None = None,
    ) -> Dispatched:
        operator = start_operator(kubeconfig=kubeconfig)
        apply_policy(
            crds, namespace, dsn=journal, broker_url=redis_url, lease_timeout=LEASE,
            sweep_interval=sweep_interval,
        )  # fmt: skip
        held = wait_for(
            lambda: (
                all(len(running_on(journal, pod)) == n for pod, n in holders.items())
                and {pod: running_on(journal, pod) for pod in holders}
            ),
            timeout_seconds=60,
            what=f"worker Pods running their bodies ({holders})",
        )
        return Dispatched(operator=operator, held=held)

    return start


def kill(journal: str, worker: workers.WorkerPod) -> datetime.datetime:
    """SIGKILL the container's main process, wait for it to be gone (its bodies die with
    its PID namespace); the database's time of the kill."""
    pid = worker.main_pid()
    worker.kill()
    wait_for(lambda: not processes.pid_alive(pid), timeout_seconds=30, what="the worker to die")
    return database_now(journal)


@pytest.mark.parametrize("age", ["old", "young"])
def test_a_pod_killed_while_the_operator_is_down_is_rescued_from_its_first_listing(
    age: str,
    journal: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
    dispatch: Callable[..., Dispatched],
) -> None:
    """The operator never sees the restart happen (no restartCount rise): its listing at
    start shows the container's previous instance ended, and that alone ends it. ``young``:
    the container dies a moment after its process registered (a crash loop's case)."""
    hang_all(journal, 2)
    doomed = worker_pods("insights-worker-a", concurrency=2, extra_env=NO_SILENCE)
    dispatched = dispatch(holders={"insights-worker-a": 2})
    held = dispatched.held["insights-worker-a"]
    if age == "old":
        wait_for(
            lambda: all(
                (database_now(journal) - started).total_seconds() > 6
                for started, _ in incarnations(journal, pod="insights-worker-a")
            ),
            timeout_seconds=30,
            what="worker a's processes to be older than the old clock margin",
        )
    dispatched.operator.kill()
    killed_at = kill(journal, doomed)
    clear_faults(journal, held)
    doomed.wait_ready(restarts=1)
    start_operator(name="operator-2")
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=90,
        what="both entries re-run (heartbeats and leases have 10 minutes to go)",
    )

    ended = [reason for _, reason in incarnations(journal, pod="insights-worker-a") if reason]
    assert ended and all(reason.startswith(PROOF) for reason in ended), ended
    assert [row[0] for row in lost_attempts(journal)] == [str(e) for e in sorted(held)]
    assert all(PROOF in row[2] for row in lost_attempts(journal))
    assert overlaps(journal, kills={"insights-worker-a": [killed_at]}) == []


def test_a_restart_ends_exactly_the_dead_instance_and_no_live_process(
    journal: str,
    worker_pods: Callable[..., workers.WorkerPod],
    dispatch: Callable[..., Dispatched],
) -> None:
    """Worker a is killed twice, the second time a moment after its new process registered
    (younger than any clock margin); worker b, another Pod, runs on. Each pod event ends
    exactly the instance that died: a's entries re-run twice, b's bodies and a's third
    instance keep their attempts."""
    hang_all(journal, 4)
    a = worker_pods("insights-worker-a", concurrency=2, extra_env=NO_SILENCE)
    worker_pods("insights-worker-b", concurrency=2, extra_env=NO_SILENCE)
    held = dispatch(holders={"insights-worker-a": 2, "insights-worker-b": 2}).held
    on_a, on_b = held["insights-worker-a"], held["insights-worker-b"]

    kills = [kill(journal, a)]
    wait_for(
        lambda: unfinished_since(journal, worker="insights-worker-a", since=kills[0]) == on_a,
        timeout_seconds=60,
        what="a's entries re-run by a's second instance",
    )
    kills.append(kill(journal, a))  # its process registered moments ago
    clear_faults(journal, on_a)
    a.wait_ready(restarts=2)
    wait_for(
        lambda: unprocessed(journal) == len(on_b),
        timeout_seconds=90,
        what="a's entries re-run a second time and finished",
    )
    a_runs = [run for run in runs(journal) if run.entry_id in on_a and run.finished_at]
    assert len(a_runs) == len(on_a)

    per_entry: dict[int, int] = {}
    for run in runs(journal):
        per_entry[run.entry_id] = per_entry.get(run.entry_id, 0) + 1
    assert per_entry == {**dict.fromkeys(on_a, 3), **dict.fromkeys(on_b, 1)}
    assert sorted(running_on(journal, "insights-worker-b")) == on_b
    of_b = incarnations(journal, pod="insights-worker-b")
    assert of_b and all(reason is None for _, reason in of_b), of_b
    # a's processes of its first two instances ended by proof; those of its third live on.
    of_a = incarnations(journal, pod="insights-worker-a")
    assert [reason is not None and reason.startswith(PROOF) for _, reason in of_a] == [
        started < kills[1] for started, _ in of_a
    ], of_a
    assert any(started > kills[1] for started, _ in of_a)
    assert sorted(int(row[0]) for row in lost_attempts(journal)) == sorted(on_a * 2)
    assert overlaps(journal, kills={"insights-worker-a": kills}) == []


@pytest.fixture
def apiserver_proxy(
    crds: devstack_kube.ControlPlane, tmp_path: Path
) -> Iterator[tuple[tcp_proxy.PausableProxy, Path]]:
    """A proxy in front of kube-apiserver and a kubeconfig through it: the operator's side of
    a partition the test opens and heals (pausing stalls every connection, its pod watch
    among them; cutting resets them, as a partition that outlived TCP does)."""
    proxy = tcp_proxy.PausableProxy(target_port=int(crds.server.rsplit(":", 1)[1]))
    kubeconfig = crds.write_kubeconfig(
        tmp_path / "operator-via-proxy.kubeconfig",
        token=crds.admin_token,
        server=f"https://127.0.0.1:{proxy.port}",
    )
    yield proxy, kubeconfig
    proxy.close()


@pytest.mark.parametrize("delay", ["watch_blocked", "operator_replaced"])
def test_a_restart_reported_late_ends_exactly_the_dead_instance(
    delay: str,
    journal: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
    dispatch: Callable[..., Dispatched],
    apiserver_proxy: tuple[tcp_proxy.PausableProxy, Path],
) -> None:
    """The kubelet reports worker a's restart while the operator cannot hear it: the
    operator's connections to the apiserver stall from just before the kill until a's new
    container runs and its new process has registered and runs bodies of its own. The
    report reaches the operator late, as one state in which ``restartCount`` already rose
    and the new instance already works:

    * ``watch_blocked``: the same operator, when its stalled watch is reset and re-lists;
    * ``operator_replaced``: the stalled operator is replaced (as its Deployment does with a
      stuck process) and the new one first hears of the Pod after the restart — it never
      saw ``restartCount`` rise at all.

    Either way the ending is exact: a's dead instance's incarnation ends (its two entries
    re-run on worker b, one committing plainly and one through ``fenced_transaction``), the
    new instance's incarnation and its bodies live on, no run of an entry overlaps another
    and no effect is applied twice."""
    proxy, via_proxy = apiserver_proxy
    hang_all(journal, 4)
    a = worker_pods("insights-worker-a", concurrency=2, extra_env=NO_SILENCE)
    dispatched = dispatch(holders={"insights-worker-a": 2}, kubeconfig=via_proxy)
    held = dispatched.held["insights-worker-a"]
    queued = sorted(set(range(1, 5)) - set(held))  # published, waiting for a free slot

    proxy.pause()
    killed_at = kill(journal, a)
    a.wait_ready(restarts=1)  # the kubelet's report is in the apiserver, not in the operator
    wait_for(
        lambda: unfinished_since(journal, worker="insights-worker-a", since=killed_at) == queued,
        timeout_seconds=60,
        what="a's new instance running the queued entries under a new incarnation",
    )
    with psycopg.connect(journal, autocommit=True) as conn:
        for entry_id, unfenced in zip(held, (True, False), strict=True):
            schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=0, unfenced=unfenced)
    worker_pods("insights-worker-b", concurrency=2, extra_env=NO_SILENCE)  # free slots
    if delay == "operator_replaced":
        dispatched.operator.kill()
    proxy.cut()
    proxy.resume()
    if delay == "operator_replaced":
        start_operator(name="operator-2", kubeconfig=via_proxy)
    wait_for(
        lambda: unprocessed(journal) == len(queued),
        timeout_seconds=90,
        what="a's dead instance's entries re-run (heartbeats and leases have 10 minutes to go)",
    )

    of_a = incarnations(journal, pod="insights-worker-a")
    assert [reason is not None and reason.startswith(PROOF) for _, reason in of_a] == [
        started < killed_at for started, _ in of_a
    ], of_a
    assert any(started > killed_at for started, _ in of_a), of_a
    assert running_on(journal, "insights-worker-a") == queued
    assert unfinished_since(journal, worker="insights-worker-a", since=killed_at) == queued
    assert sorted(int(row[0]) for row in lost_attempts(journal)) == sorted(held)
    reruns = [run for run in runs(journal) if run.started_at > killed_at and run.entry_id in held]
    assert sorted(run.entry_id for run in reruns) == sorted(held)
    assert all(run.worker == "insights-worker-b" and run.finished_at for run in reruns), reruns
    assert overlaps(journal, kills={"insights-worker-a": [killed_at]}) == []
    assert tally(journal).duplicate_successes == 0


def policy_condition(crds: devstack_kube.ControlPlane, namespace: str, kind: str) -> Any:
    got = get_json(crds, "-n", namespace, "get", "processingpolicy", "journal-insights")
    found = [c for c in got.get("status", {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else None


def test_a_frozen_worker_pod_keeps_its_entries_until_the_platform_proves_it_gone(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    worker_pods: Callable[..., workers.WorkerPod],
    dispatch: Callable[..., Dispatched],
) -> None:
    """Every process of worker a's container is stopped (SIGSTOP) for three heartbeat
    timeouts while worker b has free slots: a's silence moves nothing, the policy says why
    its entries wait (naming the Pod and its node), and deleting the Pod — one of the
    releases it names — moves them at once."""
    hang_all(journal, 2)
    # A user's Deployment without the documented liveness probe: nothing kills a container
    # frozen as a whole, so only the platform's word about the Pod can release its entries.
    # (With the probe the kubelet restarts it: tests/e2e/test_worker_liveness.py.)
    frozen = worker_pods(
        "insights-worker-a", concurrency=2, extra_env=QUICK_SILENCE, liveness_probe=False
    )
    held = dispatch(holders={"insights-worker-a": 2}, sweep_interval="3s").held["insights-worker-a"]
    # Free slots for a wrong re-dispatch to run at once, side by side with a's bodies.
    worker_pods("insights-worker-b", concurrency=2, extra_env=QUICK_SILENCE)
    for pid in frozen.container_pids():
        os.kill(pid, signal.SIGSTOP)
    frozen_at = database_now(journal)
    condition = wait_for(
        lambda: (
            (found := policy_condition(crds, namespace, "Degraded"))
            and found["reason"] == "HeldBySilentWorker"
            and found
        ),
        timeout_seconds=60,
        what="the policy to say why a's entries wait",
    )
    assert f"{namespace}/insights-worker-a" in condition["message"]
    assert frozen.node.name in condition["message"] and "out-of-service" in condition["message"]
    wait_for(
        lambda: (database_now(journal) - frozen_at).total_seconds() > 3 * SILENCE_SECONDS,
        timeout_seconds=60,
        what="three heartbeat timeouts of silence",
    )
    assert [run.entry_id for run in runs(journal) if run.started_at > frozen_at] == []

    clear_faults(journal, held)
    released_at = database_now(journal)
    frozen.delete(grace_seconds=1)
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=90, what="a's entries re-run")

    reruns = [run for run in runs(journal) if run.started_at > frozen_at]
    assert sorted(run.entry_id for run in reruns) == sorted(held)
    assert all(run.worker == "insights-worker-b" and run.started_at > released_at for run in reruns)
    assert overlaps(journal, kills={"insights-worker-a": [released_at]}) == []
    ended = [reason for _, reason in incarnations(journal, pod="insights-worker-a") if reason]
    assert ended and all("pod" in reason for reason in ended), ended
