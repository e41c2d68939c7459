"""At most one run at a time, effects exactly once: heartbeats, self-fencing, fenced commits.

Issue 11. The lease is a backstop here, not the mechanism: workers heartbeat (timeout
``HEARTBEAT_TIMEOUT_SECONDS``) and a body may outlive any lease while its worker is alive; a
worker that cannot renew stops its own bodies; a body's effect and its done mark commit in
one fenced transaction, so a stale attempt's writes roll back; a processed entry whose
attempt was lost ends ``succeeded``, never ``dead``; and the ledger migrates in place under
a worker of the previous version. Each test proves it from the database: ``task_runs``
(one row per body run, its effect committed with it), the processes that ran the bodies,
and the ledger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from fencing_support import (
    HEARTBEAT_ENV,
    BodyWatch,
    Sweeper,
    ledger_states,
    lost_attempts,
    overlapping,
    seconds_since,
    signal_worker,
    successes_by_entry,
    timed_runs,
)
from reconcile_support import (
    WorkerFactory,
    make_policy,
    pending_count,
    sweep_connections,
    sweep_until,
    wait_for,
)

from benchmarks import reconciled_worker
from benchmarks import worker as benchmark_worker
from celery_app.demo import audit, schema
from celery_reconciler import ledger, reconcile
from devstack import postgres as devstack_postgres
from devstack import tcp_proxy

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
# The last commit of main before worker incarnations: its ledger (schema version 2), its
# worker integration and its CLI are "the previous version" the migration test upgrades from.
LEDGER_BEFORE_INCARNATIONS = "055b35c9f07dbddc984911703038f016ab894860"


def test_a_body_three_times_longer_than_the_lease_completes_once(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=3)
    schema.set_fault(conn, entry_id=1, kind="sleep", seconds=18)
    policy = make_policy(
        lease_timeout="6s",
        retry={"maxAttempts": 3, "initialDelay": "1s", "factor": 1, "maxDelay": "1s"},
    )
    start_worker(
        broker_url=redis_url, dsn=demo_dsn, concurrency=2, lease_seconds=6, extra_env=HEARTBEAT_ENV
    )

    def finished() -> bool:
        short_ones_done = conn.execute(
            "SELECT bool_and(insights_extracted) FROM journal_entry WHERE id IN (2, 3)"
        ).fetchone() == (True,)
        return short_ones_done and ledger_states(conn).get("1") in ("succeeded", "dead")

    sweep_until(
        finished,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=redis_url,
        timeout_seconds=75,
        what="every entry finished (the long one succeeded or dead)",
    )

    long_runs = [(run.outcome, run.worker) for run in audit.runs(conn) if run.entry_id == 1]
    assert len(long_runs) == 1, f"the 18 s body ran {len(long_runs)} times: {long_runs}"
    assert long_runs[0][0] == "succeeded"
    assert lost_attempts(conn) == []
    assert ledger_states(conn) == {"1": "succeeded", "2": "succeeded", "3": "succeeded"}


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_a_worker_cut_off_from_the_database_stops_its_bodies_before_they_run_again(
    pool: str,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    postgres: devstack_postgres.PostgresServer,
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    # The solo pool runs one body at a time, so one entry there; two for the others.
    entries = 1 if pool == "solo" else 2
    schema.seed(conn, count=entries)
    for entry_id in range(1, entries + 1):
        schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=30)
    policy = make_policy(lease_timeout="8s")
    proxy = tcp_proxy.PausableProxy(target_port=postgres.port)
    address = f"127.0.0.1:{postgres.port}/"
    assert address in demo_dsn
    through_proxy = demo_dsn.replace(address, f"127.0.0.1:{proxy.port}/")
    try:
        cut_off = start_worker(
            broker_url=redis_url,
            dsn=through_proxy,
            concurrency=2,
            lease_seconds=8,
            pool=pool,
            extra_env=HEARTBEAT_ENV,
        )
        with BodyWatch(demo_dsn) as watch, Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
            wait_for(
                lambda: len(ledger_rows_running_on(conn, cut_off.name)) == entries,
                timeout_seconds=30,
                what="every body running on the worker behind the proxy",
            )
            conn.execute("DELETE FROM demo_faults")  # the re-runs, if any, are quick
            proxy.pause()
            start_worker(
                broker_url=redis_url,
                dsn=demo_dsn,
                concurrency=2,
                lease_seconds=8,
                pool=pool,
                extra_env=HEARTBEAT_ENV,
            )
            wait_for(
                lambda: pending_count(conn) == 0,
                timeout_seconds=75,
                what="the entries processed by the worker that still reaches the database",
                poll_seconds=0.3,
            )
            runs = timed_runs(conn, died_at=dict(watch.died_at))
    finally:
        proxy.resume()
        proxy.close()

    overlaps = [
        (first.run.worker, str(first.ended), second.run.worker, str(second.run.started_at))
        for first, second in overlapping(runs)
    ]
    assert overlaps == [], "a body ran again while the cut-off worker still ran it"
    assert successes_by_entry(conn) == dict.fromkeys(range(1, entries + 1), 1)


def ledger_rows_running_on(conn: psycopg.Connection[Any], worker: str) -> list[tuple[Any, ...]]:
    exists = conn.execute("SELECT to_regclass('celery_reconciler.entries')").fetchone()
    if exists is None or exists[0] is None:
        return []
    return conn.execute(
        "SELECT e.entry_id FROM celery_reconciler.entries e "
        "JOIN task_runs r ON r.task_id = e.fence_token::text "
        "WHERE e.state = 'running' AND r.worker = %s AND r.finished_at IS NULL",
        [worker],
    ).fetchall()


def test_a_dead_workers_entry_runs_next_not_behind_the_backlog(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str, start_worker: WorkerFactory
) -> None:
    """A worker dies mid-body while another drains a backlog of 600 queued entries: its
    heartbeat stops, the sweep loop rescues the entry (the lease is 10 minutes), and the
    rescued body starts next — at most a body or two of the backlog in between (the one
    running and the one prefetched), not the rest of the queue."""
    schema.seed(conn, count=601)
    schema.set_fault(conn, entry_id=1, kind="sleep", seconds=600)
    conn.execute(
        "INSERT INTO demo_faults (entry_id, kind, seconds) "
        "SELECT id, 'sleep', 0.02 FROM journal_entry WHERE id > 1"
    )
    policy = make_policy(lease_timeout="10m")
    with Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
        wait_for(
            lambda: ledger_states(conn).get("1") == "queued",
            timeout_seconds=30,
            what="the backlog dispatched",
        )
        doomed = start_worker(
            broker_url=redis_url, dsn=demo_dsn, concurrency=1, extra_env=HEARTBEAT_ENV
        )
        wait_for(
            lambda: ledger_states(conn).get("1") == "running",
            timeout_seconds=30,
            what="entry 1 running on the doomed worker",
        )
        start_worker(broker_url=redis_url, dsn=demo_dsn, concurrency=1, extra_env=HEARTBEAT_ENV)
        wait_for(
            lambda: 601 - pending_count(conn) >= 20,
            timeout_seconds=30,
            what="the other worker draining the backlog",
        )
        schema.clear_fault(conn, entry_id=1)
        doomed.kill()
        wait_for(
            lambda: (
                conn.execute("SELECT insights_extracted FROM journal_entry WHERE id = 1").fetchone()
                == (True,)
            ),
            timeout_seconds=60,
            what="entry 1 rescued and processed (the lease has 10 minutes to go)",
            poll_seconds=0.3,
        )
        left_in_backlog = pending_count(conn)
    assert left_in_backlog > 100, "the backlog drained before the rescue: nothing to measure"
    rescued = conn.execute(
        "SELECT dispatched_at FROM celery_reconciler.attempts WHERE entry_id = '1' "
        "ORDER BY attempt DESC LIMIT 1"
    ).fetchone()
    assert rescued is not None
    rerun = [run for run in audit.runs(conn) if run.entry_id == 1 and run.outcome == "succeeded"]
    assert len(rerun) == 1
    overtaking = conn.execute(
        "SELECT count(*) FROM task_runs WHERE entry_id <> 1 AND started_at > %s "
        "AND started_at < %s",
        [rescued[0], rerun[0].started_at],
    ).fetchone()
    assert overtaking is not None and overtaking[0] <= 2, (
        f"{overtaking[0]} backlog bodies started between the rescue's re-dispatch and the "
        "rescued body"
    )


def test_a_processed_entry_whose_worker_died_before_recording_it_ends_succeeded_not_dead(
    demo_dsn: str, conn: psycopg.Connection[Any], redis_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=3)
    schema.set_fault(conn, entry_id=1, kind="unfenced_commit_then_kill")
    # Its last allowed attempt: a lost attempt of entry 1 has no retry to fall back on.
    policy = make_policy(
        lease_timeout="8s",
        retry={"maxAttempts": 1, "initialDelay": "1s", "factor": 1, "maxDelay": "1s"},
    )
    victim = start_worker(
        broker_url=redis_url, dsn=demo_dsn, concurrency=1, lease_seconds=8, extra_env=HEARTBEAT_ENV
    )
    with Sweeper(policy, dsn=demo_dsn, broker_url=redis_url):
        wait_for(
            lambda: not victim.process.running(),
            timeout_seconds=30,
            what="the worker to kill itself right after committing entry 1's effect",
        )
        with conn.execute("SELECT insights_extracted FROM journal_entry WHERE id = 1") as cur:
            assert cur.fetchone() == (True,)  # the effect is committed: the entry is processed
        start_worker(
            broker_url=redis_url,
            dsn=demo_dsn,
            concurrency=1,
            lease_seconds=8,
            extra_env=HEARTBEAT_ENV,
        )

        def settled() -> bool:
            states = ledger_states(conn)
            return (
                pending_count(conn) == 0
                and len(states) == 3
                and not set(states.values()) & {"queued", "running", "retry_wait"}
            )

        wait_for(
            settled,
            timeout_seconds=60,
            what="every entry processed and its ledger row settled",
            poll_seconds=0.3,
        )
    assert ledger_states(conn) == {"1": "succeeded", "2": "succeeded", "3": "succeeded"}
    assert successes_by_entry(conn) == {1: 1, 2: 1, 3: 1}


# Where the worker stops, the one-shot fault that stops its body there, and maxAttempts:
# before the commit a re-run is the right outcome (so a second attempt is allowed); after the
# commit, there is nothing to re-run and a lost last attempt must not leave the entry dead.
COMMIT_POINTS = {
    "before_commit": ("hold_before_commit", 2),
    "between_commit_and_done_mark": ("hold_after_commit", 1),
    "after_done_mark": ("hold_after_done", 1),
}
HOLD_SECONDS = 4.0
LEASE_SECONDS = 8


def incarnation_ended(conn: psycopg.Connection[Any], *, hostname: str) -> bool:
    """Whether every incarnation of the worker ``hostname`` registered is ended (and one is)."""
    row = conn.execute(
        "SELECT count(*), count(ended_at) FROM celery_reconciler.incarnations WHERE hostname = %s",
        [hostname],
    ).fetchone()
    return row is not None and row[0] > 0 and row[0] == row[1]


def sessions_of(conn: psycopg.Connection[Any], *, worker: str) -> int:
    """The database sessions a worker process still holds (its task and heartbeat ones)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "OR application_name = %s",
        [f"celery-worker {worker}", f"celery-worker {worker} heartbeat"],
    ).fetchone()
    return 0 if row is None else int(row[0])


@pytest.mark.parametrize("point", list(COMMIT_POINTS))
def test_a_worker_frozen_then_killed_at_each_commit_point_leaves_each_effect_exactly_once(
    point: str,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    broker_url: str,
    start_worker: WorkerFactory,
) -> None:
    """SIGSTOP at the point is a long GC pause or a partition: the worker cannot heartbeat,
    its attempt is judged lost and may run elsewhere; then it wakes up (SIGCONT) with its body
    mid-way, and is finally killed. A stale body's commit must roll back.

    The threads pool: Celery enforces no time limit there, so nothing but the fence can stop
    the woken body (under prefork, today's hard time limit would kill it on waking and hide
    the hole this test is about)."""
    fault, max_attempts = COMMIT_POINTS[point]
    schema.seed(conn, count=3)
    schema.set_fault(conn, entry_id=1, kind=fault, seconds=HOLD_SECONDS)
    policy = make_policy(
        lease_timeout=f"{LEASE_SECONDS}s",
        retry={"maxAttempts": max_attempts, "initialDelay": "1s", "factor": 1, "maxDelay": "1s"},
    )
    frozen = start_worker(
        broker_url=broker_url,
        dsn=demo_dsn,
        concurrency=1,
        lease_seconds=LEASE_SECONDS,
        pool="threads",
        extra_env=HEARTBEAT_ENV,
    )
    with Sweeper(policy, dsn=demo_dsn, broker_url=broker_url) as sweeper:

        def at_the_point() -> bool:
            row = conn.execute("SELECT count(*) FROM demo_faults WHERE entry_id = 1").fetchone()
            return row == (0,)  # the one-shot fault fired: the body sleeps at the point

        wait_for(at_the_point, timeout_seconds=30, what=f"entry 1's body to reach {point}")
        signal_worker(frozen, signal.SIGSTOP)
        frozen_at = audit.database_now(conn)
        try:
            start_worker(
                broker_url=broker_url,
                dsn=demo_dsn,
                concurrency=1,
                lease_seconds=LEASE_SECONDS,
                pool="threads",
                extra_env=HEARTBEAT_ENV,
            )
            # Whatever the operator does about the frozen attempt, it has done: it ended
            # the silent incarnation (heartbeat timeout), every entry is processed, and
            # sweeps ran past the attempt's lease too.
            wait_for(
                lambda: (
                    incarnation_ended(conn, hostname=frozen.name)
                    and seconds_since(conn, frozen_at) > LEASE_SECONDS
                    and pending_count(conn) == 0
                ),
                timeout_seconds=75,
                what="the frozen incarnation ended, the lease passed and every entry processed",
                poll_seconds=0.3,
            )
            sweeps = sweeper.sweeps
            wait_for(
                lambda: sweeper.sweeps >= sweeps + 2,
                timeout_seconds=30,
                what="two more sweeps past the lease",
                poll_seconds=0.1,
            )
        finally:
            signal_worker(frozen, signal.SIGCONT)
        woken_at = audit.database_now(conn)
        # Let the woken body finish whatever it would do (its hold had < HOLD_SECONDS left):
        # at once if its own watchdog or its guardian kills the woken process (it has been
        # silent for longer than its heartbeat timeout) and its sessions are gone from the
        # database, so that no commit of it is still on its way; else after a bound.
        wait_for(
            lambda: (
                (not frozen.process.running() and not sessions_of(conn, worker=frozen.name))
                or seconds_since(conn, woken_at) > HOLD_SECONDS + 4
            ),
            timeout_seconds=30,
            what="the woken worker's body to have had its chance to commit",
            poll_seconds=0.1,
        )
        frozen.kill()

        def settled() -> bool:
            states = ledger_states(conn)
            return len(states) == 3 and not set(states.values()) & {"queued", "running"}

        wait_for(settled, timeout_seconds=60, what="every ledger row settled", poll_seconds=0.3)
        wait_for(
            lambda: "retry_wait" not in ledger_states(conn).values(),
            timeout_seconds=30,
            what="no entry waiting for a retry",
            poll_seconds=0.3,
        )
    assert successes_by_entry(conn) == {1: 1, 2: 1, 3: 1}, "an effect was committed twice"
    assert ledger_states(conn) == {"1": "succeeded", "2": "succeeded", "3": "succeeded"}


def test_the_ledger_migrates_in_place_under_running_attempts_of_the_previous_version(
    tmp_path: Path,
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    start_worker: WorkerFactory,
) -> None:
    """The previous release's CLI sweeps and its worker runs two long bodies; then this
    version's sweeps (which migrate the ledger) and a worker of this version take over while
    those bodies still run. No entry is lost, none runs twice."""
    previous = previous_release(tmp_path / "previous")
    previous_env = previous_release_env(previous)
    schema.seed(conn, count=8)
    for entry_id in (1, 2):
        schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=12)
    policy = make_policy(lease_timeout="20s")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "celery-reconciler.io/v1alpha1",
                "kind": "ProcessingPolicy",
                "metadata": {"name": "journal-insights", "namespace": "test"},
                "spec": schema.policy_spec(
                    lease_timeout="20s",
                    retry={"maxAttempts": 5, "initialDelay": "1s", "factor": 2, "maxDelay": "5s"},
                ),
            }
        )
    )
    swept = subprocess.run(
        [sys.executable, "-m", "celery_reconciler", "sweep", "--policy", str(policy_file)],
        env={
            **os.environ,
            **previous_env,
            "CELERY_RECONCILER_DSN": demo_dsn,
            "CELERY_BROKER_URL": redis_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert swept.returncode == 0, swept.stderr
    assert "dispatched 8 entries" in swept.stdout
    old_worker = start_worker(
        broker_url=redis_url, dsn=demo_dsn, concurrency=2, lease_seconds=20, extra_env=previous_env
    )
    wait_for(
        lambda: len(ledger_rows_running_on(conn, old_worker.name)) == 2,
        timeout_seconds=30,
        what="the previous version's worker running the two long bodies",
    )
    with conn.execute("SELECT max(version) FROM celery_reconciler.schema_migrations") as cur:
        assert cur.fetchone() == (2,)  # the previous version's ledger, running attempts in it

    new_worker = start_worker(
        broker_url=redis_url, dsn=demo_dsn, concurrency=2, lease_seconds=20, extra_env=HEARTBEAT_ENV
    )
    sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=redis_url,
        timeout_seconds=75,
        interval_seconds=0.5,
    )
    old_worker.stop()

    assert audit.overlapping_runs(audit.runs(conn)) == []
    assert successes_by_entry(conn) == dict.fromkeys(range(1, 9), 1)
    wait_for(
        lambda: set(ledger_states(conn).values()) == {"succeeded"},
        timeout_seconds=30,
        what="every ledger row succeeded",
    )
    # Successes recorded before and after the migration: each in the tally exactly once.
    assert ledger.counts(conn, policy_key=policy.key).succeeded == 8
    # Only this version's worker registers incarnations (which also proves that the previous
    # version's worker really ran the previous code): the migrated ledger holds its own.
    hostnames = {
        row[0] for row in conn.execute("SELECT hostname FROM celery_reconciler.incarnations")
    }
    assert hostnames == {new_worker.name}


def previous_release(target: Path) -> Path:
    """The worker integration, demo app and operator of ``LEDGER_BEFORE_INCARNATIONS``."""
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", LEDGER_BEFORE_INCARNATIONS,
         "celery_app", "operator/celery_reconciler"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import celery_app.reliable, celery_app.demo.tasks, celery_reconciler.ledger; "
            "print(celery_app.reliable.__file__, celery_app.demo.tasks.__file__, "
            "celery_reconciler.ledger.__file__)",
        ],
        env={**os.environ, **previous_release_env(target)},
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(path.startswith(str(target)) for path in probe.stdout.split()), probe.stdout
    return target


def previous_release_env(previous: Path) -> dict[str, str]:
    """Run the previous release's code: its packages first on the path, and not this
    checkout's (``python -m`` puts the current directory first, so does ``celery -A``: hence
    no such entry, and a celery worker that works in the previous release's directory)."""
    return {
        "PYTHONPATH": f"{previous / 'operator'}{os.pathsep}{previous}",
        "PYTHONSAFEPATH": "1",
        "CELERY_WORKDIR": str(previous),
    }


TAKE_AND_HOLD = """
import sys, time
import kombu
with kombu.Connection(sys.argv[1]) as connection:
    queue = connection.SimpleQueue("insights", no_ack=False)
    message = queue.get(timeout=10)
    print("taken", message.headers["id"], flush=True)
    time.sleep(600)
"""


def test_a_message_taken_by_a_worker_that_died_before_starting_it_runs_again_at_once(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    """A consumer takes the message the way a worker does (kombu, acknowledged late) and is
    SIGKILLed before any body starts. Redis: the message sits unacknowledged until the
    visibility timeout, the entry stays queued until its 10-minute lease — unless the sweep
    sees the stranded delivery and dispatches the entry again. RabbitMQ: the broker puts
    the message back when the consumer's connection dies, and it runs as it is."""
    schema.seed(conn, count=1)
    policy = make_policy(lease_timeout="10m")
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        assert reconcile.reconcile_once(policy, db=db, broker=publisher).published == 1
        taker = subprocess.Popen(
            [sys.executable, "-c", TAKE_AND_HOLD, broker_url],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert taker.stdout is not None
            taken = taker.stdout.readline().split()
            assert taken[:1] == ["taken"], taken
        finally:
            os.killpg(taker.pid, signal.SIGKILL)
            taker.wait()
        assert ledger_states(conn) == {"1": "queued"}
        on_redis = broker_url.startswith("redis")
        # Redis: the message is only in "unacked"; RabbitMQ requeued it.
        wait_for(
            lambda: publisher.queue_depth("insights") == (0 if on_redis else 1),
            timeout_seconds=10,
            what="the taken message's place in the broker",
        )
    start_worker(broker_url=broker_url, dsn=demo_dsn, extra_env=HEARTBEAT_ENV)
    sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=30,
        interval_seconds=0.5,
    )
    assert successes_by_entry(conn) == {1: 1}
    stale = conn.execute(
        "SELECT fence_token::text FROM celery_reconciler.entries WHERE entry_id = '1'"
    ).fetchone()
    assert stale is not None
    if on_redis:
        assert stale[0] != taken[1]  # dispatched again, under a new fence
    else:
        assert stale[0] == taken[1]  # the requeued message itself ran


def test_a_worker_that_shuts_down_hands_over_its_finished_bodies(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    """Successes are marked by the heartbeat, in batches. A worker stopped the way Kubernetes
    stops it (SIGTERM to its main process) marks what its bodies finished as it exits, so
    nothing is left ``running`` under a silent incarnation — which the sweep would charge
    as lost attempts. The heartbeat timeout is an hour here: no heartbeat can do it instead."""
    schema.seed(conn, count=20)
    reconciled = next(form for form in benchmark_worker.FORMS if form.name == "ours")
    assert reconciled.queue == reconciled_worker.QUEUE
    assert benchmark_worker.enqueue_ours(demo_dsn, broker_url, entries=20, form=reconciled) == 20
    worker = start_worker(
        broker_url=broker_url,
        dsn=demo_dsn,
        app="benchmarks.reconciled_worker",
        queue=reconciled_worker.QUEUE,
        extra_env={"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": "3600", "PYTHONPATH": str(REPOSITORY)},
    )
    wait_for(lambda: pending_count(conn) == 0, timeout_seconds=60, what="the backlog drained")
    assert worker.process.popen is not None
    os.kill(worker.process.popen.pid, signal.SIGTERM)
    worker.process.popen.wait(30)
    assert set(ledger_states(conn).values()) == {"succeeded"}
    outcomes = conn.execute(
        "SELECT outcome, count(*) FROM celery_reconciler.attempts GROUP BY 1"
    ).fetchall()
    assert outcomes == [("succeeded", 20)]
