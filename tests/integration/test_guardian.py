"""A body whose process cannot stop itself is stopped from outside before its entry runs again.

Issue 21. A process that is paused (SIGSTOP) or whose threads cannot run (a body holding the
GIL in one C call) cannot run its own watchdog: its worker's guardian kills it, waits until
it is gone, and only then ends its incarnation — the proof on which the operator
re-dispatches. And in the threads pool, a body that outlives its incarnation stays watched
when another body registers anew; and the liveness probe fails while a whole worker, its
guardian included, is frozen. Leases are long here, so only a rescue re-runs an entry;
every verdict comes from the bodies' own start/end rows (one PostgreSQL clock), the deaths
of their processes, and the ledger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fencing_support import (
    HEARTBEAT_ENV,
    HEARTBEAT_TIMEOUT_SECONDS,
    BodyWatch,
    Sweeper,
    TimedRun,
    overlapping,
    seconds_since,
    successes_by_entry,
    timed_runs,
)
from reconcile_support import WorkerFactory, make_policy, pending_count, sweep_connections, wait_for

from celery_app.demo import schema
from celery_reconciler import reconcile
from celery_reconciler_worker import guardian, probe, ticks

pytestmark = pytest.mark.integration

# Far past the heartbeat timeout: only a kill can end these bodies sooner.
HOLD_SECONDS = 2.5 * HEARTBEAT_TIMEOUT_SECONDS
FENCED, PLAIN = 1, 2  # entry 1 commits through fenced_transaction, entry 2 without it


def seed_fenced_and_plain(conn: psycopg.Connection[Any], *, kind: str) -> None:
    schema.seed(conn, count=2)
    schema.set_fault(conn, entry_id=FENCED, kind=kind, seconds=HOLD_SECONDS)
    schema.set_fault(conn, entry_id=PLAIN, kind=kind, seconds=HOLD_SECONDS, unfenced=True)


def first_runs(conn: psycopg.Connection[Any]) -> dict[int, tuple[int, str]]:
    """Entry -> (pid, worker) of its first body run."""
    found: dict[int, tuple[int, str]] = {}
    for entry_id, pid, worker in conn.execute(
        "SELECT entry_id, pid, worker FROM task_runs ORDER BY started_at"
    ):
        found.setdefault(int(entry_id), (int(pid), str(worker)))
    return found


def incarnation_of(conn: psycopg.Connection[Any], *, pid: int, worker: str) -> tuple[Any, ...]:
    """(last heartbeat, ended_at, ended_reason) of the incarnation a body process registered."""
    row = conn.execute(
        "SELECT heartbeat_at, ended_at, ended_reason FROM celery_reconciler.incarnations "
        "WHERE pid = %s AND hostname = %s ORDER BY started_at DESC LIMIT 1",
        [pid, worker],
    ).fetchone()
    assert row is not None, f"process {pid} of {worker} registered no incarnation"
    return tuple(row)


def verdict(conn: psycopg.Connection[Any], runs: list[TimedRun]) -> None:
    """Each entry re-ran (the precondition: a rescue happened), never while its first body
    still ran, and its effect was committed once."""
    by_entry: dict[int, list[TimedRun]] = {}
    for timed in runs:
        by_entry.setdefault(timed.run.entry_id, []).append(timed)
    assert {entry: len(found) >= 2 for entry, found in by_entry.items()} == {
        FENCED: True,
        PLAIN: True,
    }, f"no rescue to judge: {by_entry}"
    overlaps = [
        (first.run.entry_id, first.pid, str(first.ended), second.pid, str(second.run.started_at))
        for first, second in overlapping(runs)
    ]
    assert overlaps == [], "an entry ran again while its first body still ran"
    assert successes_by_entry(conn) == {FENCED: 1, PLAIN: 1}, "an effect was committed twice"


def start_holders(
    start_worker: WorkerFactory, *, pool: str, dsn: str, broker_url: str, extra_env: dict[str, str]
) -> None:
    # One body per worker: in one process, a body holding the GIL would keep the other from
    # even reaching its fault.
    for _ in (FENCED, PLAIN):
        start_worker(broker_url=broker_url, dsn=dsn, concurrency=1, pool=pool, extra_env=extra_env)


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_a_body_holding_the_gil_past_the_timeout_is_killed_before_its_entry_runs_again(
    pool: str,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    seed_fenced_and_plain(conn, kind="gil")
    policy = make_policy(lease_timeout="10m")
    start_holders(
        start_worker, pool=pool, dsn=demo_dsn, broker_url=redis_url, extra_env=HEARTBEAT_ENV
    )
    with BodyWatch(demo_dsn) as watch, Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
        wait_for(
            lambda: (
                conn.execute("SELECT count(*) FROM demo_faults WHERE kind = 'gil'").fetchone()
                == (0,)
            ),
            timeout_seconds=30,
            what="both bodies in their GIL-holding C call",
        )
        start_worker(broker_url=redis_url, dsn=demo_dsn, pool=pool, extra_env=HEARTBEAT_ENV)
        wait_for(
            lambda: pending_count(conn) == 0,
            timeout_seconds=60,
            what="both entries processed by a rescue (the lease has 10 minutes to go)",
            poll_seconds=0.3,
        )
        first = first_runs(conn)
        started = conn.execute("SELECT min(started_at) FROM task_runs").fetchone()
        assert started is not None
        # Whatever the first bodies would do after their C call, they have done it by then.
        wait_for(
            lambda: seconds_since(conn, started[0]) > HOLD_SECONDS + 3,
            timeout_seconds=60,
            what="the C calls to be over",
            poll_seconds=0.3,
        )
        runs = timed_runs(conn, died_at=dict(watch.died_at))
    for entry_id, (pid, worker) in first.items():
        heartbeat_at, ended_at, _ = incarnation_of(conn, pid=pid, worker=worker)
        # The precondition: the process really was starved (its heartbeat thread, which
        # renews every fifth of the timeout, fell silent for half of it before the end).
        assert ended_at is not None
        assert (ended_at - heartbeat_at).total_seconds() > HEARTBEAT_TIMEOUT_SECONDS / 2, (
            entry_id,
            heartbeat_at,
            ended_at,
        )
    verdict(conn, runs)
    for pid, worker in first.values():
        # Who ended them: the guardian, on the proof that their processes were gone.
        reason = incarnation_of(conn, pid=pid, worker=worker)[2]
        assert reason is not None and "guardian" in reason, reason


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_body_process_frozen_past_the_timeout_is_killed_before_its_entry_runs_again(
    pool: str,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    seed_fenced_and_plain(conn, kind="sleep")
    policy = make_policy(lease_timeout="10m")
    start_holders(
        start_worker, pool=pool, dsn=demo_dsn, broker_url=redis_url, extra_env=HEARTBEAT_ENV
    )
    with BodyWatch(demo_dsn) as watch, Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
        wait_for(
            lambda: len(first_runs(conn)) == 2,
            timeout_seconds=30,
            what="both bodies running",
        )
        conn.execute("UPDATE demo_faults SET seconds = 0")  # the re-runs are quick
        frozen = {pid for pid, _ in first_runs(conn).values()}
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        wait_for(
            lambda: {process_state(pid) for pid in frozen} == {"T"},
            timeout_seconds=10,
            what="both body processes stopped",
        )
        frozen_at = conn.execute("SELECT clock_timestamp()").fetchone()
        assert frozen_at is not None
        start_worker(broker_url=redis_url, dsn=demo_dsn, pool=pool, extra_env=HEARTBEAT_ENV)
        try:
            wait_for(
                lambda: seconds_since(conn, frozen_at[0]) > 2 * HEARTBEAT_TIMEOUT_SECONDS,
                timeout_seconds=60,
                what="twice the heartbeat timeout",
                poll_seconds=0.3,
            )
            # The precondition: each stayed frozen until then, or was killed meanwhile.
            assert {process_state(pid) for pid in frozen} <= {"T", "Z", "gone"}
        finally:
            for pid in frozen:
                if process_state(pid) == "T":
                    os.kill(pid, signal.SIGCONT)
        woken_at = conn.execute("SELECT clock_timestamp()").fetchone()
        assert woken_at is not None
        wait_for(
            lambda: pending_count(conn) == 0,
            timeout_seconds=60,
            what="both entries processed",
            poll_seconds=0.3,
        )
        # What a woken body would still do (its sleep had HOLD_SECONDS in all), it has done.
        wait_for(
            lambda: seconds_since(conn, woken_at[0]) > HOLD_SECONDS,
            timeout_seconds=60,
            what="the woken bodies' chance to run on",
            poll_seconds=0.3,
        )
        runs = timed_runs(conn, died_at=dict(watch.died_at))
    verdict(conn, runs)


# Long enough that the race below is still on when the process answers, on a loaded machine.
FIRST_BODY_SECONDS = 45


def test_a_threads_pool_body_that_outlives_its_incarnation_stays_watched(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    """Entry 1's body runs under incarnation X when the operator ends X; before the worker's
    heartbeat learns it, another body of the same process is refused under X and registers
    anew. The first body runs under an ended incarnation — its entry is re-dispatched — so
    it must die, not run on unwatched beside the re-run. A long heartbeat timeout leaves
    that window wide open (the heartbeat comes every fifth of it)."""
    schema.seed(conn, count=1)
    schema.set_fault(conn, entry_id=1, kind="sleep", seconds=FIRST_BODY_SECONDS)
    policy = make_policy(lease_timeout="10m")
    slow_heartbeat = {"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": "120"}
    racer = start_worker(
        broker_url=redis_url, dsn=demo_dsn, concurrency=2, pool="threads", extra_env=slow_heartbeat
    )
    with BodyWatch(demo_dsn) as watch:
        with sweep_connections(demo_dsn, redis_url) as (db, publisher):
            reconcile.reconcile_once(policy, db=db, broker=publisher)
            wait_for(lambda: len(first_runs(conn)) == 1, timeout_seconds=30, what="entry 1 running")
            conn.execute("UPDATE demo_faults SET seconds = 0")
            [(pid, _)] = first_runs(conn).values()
            ended = conn.execute(
                "UPDATE celery_reconciler.incarnations SET ended_at = now(), "
                "ended_reason = 'ended by the test, as the operator ends a silent incarnation' "
                "WHERE pid = %s AND hostname = %s AND ended_at IS NULL RETURNING id",
                [pid, racer.name],
            ).fetchall()
            assert len(ended) == 1
            old_incarnation: uuid.UUID = ended[0][0]
            schema.seed(conn, count=1)
            # Re-dispatches entry 1 (its incarnation ended) and dispatches entry 2.
            reconcile.reconcile_once(policy, db=db, broker=publisher)

            # The precondition: the race is on — a second delivery reached that process
            # while its first body still ran under the ended incarnation.
            wait_for(
                lambda: racer.log().count(" received") >= 2,
                timeout_seconds=30,
                what="a second delivery to the racing process",
            )

            def answered() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM celery_reconciler.incarnations "
                    "WHERE pid = %s AND hostname = %s AND id <> %s",
                    [pid, racer.name, old_incarnation],
                ).fetchone()
                registered_anew = row is not None and row[0] >= 1
                return registered_anew or process_state(pid) in ("Z", "gone")

            wait_for(answered, timeout_seconds=30, what="the process to register anew or die")
            # The race needs the first body still running when the process answers; on a
            # machine at load ~15 the steps above once took longer than the body's sleep,
            # the body ended on its own (fence lost) and its end read as an overlap.
            first_started = conn.execute("SELECT min(started_at) FROM task_runs").fetchone()
            assert first_started is not None
            assert seconds_since(conn, first_started[0]) < FIRST_BODY_SECONDS, (
                "precondition: the first body was still running when the process answered"
            )
        start_worker(broker_url=redis_url, dsn=demo_dsn, concurrency=2, extra_env=HEARTBEAT_ENV)
        with Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
            wait_for(
                lambda: pending_count(conn) == 0,
                timeout_seconds=60,
                what="both entries processed",
                poll_seconds=0.3,
            )
            started = conn.execute("SELECT min(started_at) FROM task_runs").fetchone()
            assert started is not None
            wait_for(
                lambda: seconds_since(conn, started[0]) > FIRST_BODY_SECONDS + 3,
                timeout_seconds=60,
                what="the first body's sleep to be over",
                poll_seconds=0.3,
            )
        runs = timed_runs(conn, died_at=dict(watch.died_at))
    assert len([timed for timed in runs if timed.run.entry_id == 1]) >= 2, "entry 1 never re-ran"
    overlaps = [
        (first.pid, str(first.ended), second.pid, str(second.run.started_at))
        for first, second in overlapping(runs)
    ]
    assert overlaps == [], "entry 1 ran again beside its unwatched first body"
    assert successes_by_entry(conn) == {1: 1, 2: 1}


def run_probe(run_directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_reconciler_worker.probe"],
        env={**os.environ, "CELERY_RECONCILER_RUN_DIRECTORY": str(run_directory)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def guardian_ticked_itself(run_directory: Path) -> ticks.Tick | None:
    """The guardian's tick once the guardian itself wrote it (not its worker, for it)."""
    for path in run_directory.glob(f"worker-*/{ticks.GUARDIAN_FILE}"):
        tick = ticks.read(path)
        if tick is not None and str(tick.pid) != path.parent.name.split("-")[1]:
            return tick
    return None


def test_the_liveness_probe_fails_while_the_whole_worker_is_frozen(
    tmp_path: Path,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    """A worker frozen as a whole — its guardian too, as in a frozen container — is what only
    the kubelet can stop: the probe it runs must fail then, and pass again once it runs."""
    run_directory = tmp_path / "run"
    schema.seed(conn, count=1)
    schema.set_fault(conn, entry_id=1, kind="sleep", seconds=120)
    policy = make_policy(lease_timeout="10m")
    worker = start_worker(
        broker_url=redis_url,
        dsn=demo_dsn,
        concurrency=1,
        extra_env={**HEARTBEAT_ENV, "CELERY_RECONCILER_RUN_DIRECTORY": str(run_directory)},
    )
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        reconcile.reconcile_once(policy, db=db, broker=publisher)
    wait_for(lambda: len(first_runs(conn)) == 1, timeout_seconds=30, what="the body running")
    # The guardian starts beside the worker and may tick first after the body began (the
    # record until then is the one its worker wrote, under the worker's pid): a precondition
    # waited for.
    wait_for(
        lambda: guardian_ticked_itself(run_directory),
        timeout_seconds=30,
        what="the guardian's own first tick",
    )
    healthy = run_probe(run_directory)
    assert healthy.returncode == 0, healthy.stderr  # the precondition: a live worker passes
    guardian_record = guardian_ticked_itself(run_directory)
    assert guardian_record is not None
    popen = worker.process.popen
    assert popen is not None
    frozen_at = conn.execute("SELECT clock_timestamp()").fetchone()
    assert frozen_at is not None
    os.killpg(popen.pid, signal.SIGSTOP)  # the worker and its pool
    os.kill(guardian_record.pid, signal.SIGSTOP)  # the guardian, in a process group of its own
    [(body_pid, _)] = first_runs(conn).values()
    try:
        frozen = (popen.pid, body_pid, guardian_record.pid)
        wait_for(
            lambda: {process_state(pid) for pid in frozen} == {"T"},
            timeout_seconds=10,
            what="the worker, its body process and its guardian stopped",
        )
        wait_for(
            lambda: seconds_since(conn, frozen_at[0]) > HEARTBEAT_TIMEOUT_SECONDS + 1,
            timeout_seconds=30,
            what="the heartbeat timeout and more (the probe's bound: twice the guardian's)",
            poll_seconds=0.3,
        )
        stale = run_probe(run_directory)
    finally:
        os.kill(guardian_record.pid, signal.SIGCONT)
        os.killpg(popen.pid, signal.SIGCONT)
    assert stale.returncode == 1, (stale.returncode, stale.stderr)
    assert f"guardian {guardian_record.pid} silent" in stale.stderr, stale.stderr
    assert f"process {body_pid} running 1 bodies silent" in stale.stderr, stale.stderr
    wait_for(
        lambda: run_probe(run_directory).returncode == 0,
        timeout_seconds=30,
        what="the probe to pass again once the worker runs (its stale body killed)",
    )


def test_a_worker_frozen_before_its_guardian_first_ticks_fails_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guardian takes a second or more to import and tick on a busy node, and celery may
    log ``ready.`` before it has. A container frozen in that window must still fail the
    liveness probe once the timeout has passed (the clean-clone suite once froze a worker Pod
    there, and the kubelet never restarted it), yet a worker starting normally passes."""
    monkeypatch.setenv(ticks.RUN_ROOT_VARIABLE, str(tmp_path))
    monkeypatch.setenv(ticks.RUN_DIRECTORY_VARIABLE, "")  # start() sets it; restored after
    timeout_seconds = 2.0
    started_at = time.monotonic()
    guardian_process = guardian.start(
        dsn="postgresql://127.0.0.1:1/unused", timeout_seconds=timeout_seconds
    )
    assert guardian_process is not None
    try:
        os.kill(guardian_process.pid, signal.SIGSTOP)  # frozen with its container
        [directory] = list(tmp_path.glob("worker-*"))
        tick = ticks.read(directory / ticks.GUARDIAN_FILE)
        # The precondition: the guardian itself never ticked (its imports take far longer
        # than this test took to stop it).
        assert tick is None or tick.pid != guardian_process.pid, tick
        assert probe.problems(tmp_path, now=started_at) == []  # within the timeout: starting
        stale = probe.problems(tmp_path, now=time.monotonic() + timeout_seconds + 0.5)
        assert [line.split(":")[0] for line in stale] == [directory.name], stale
        assert "guardian" in stale[0] and "since it was started" in stale[0], stale
    finally:
        guardian_process.kill()
        guardian_process.wait(timeout=30)
