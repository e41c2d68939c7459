"""Nothing lost and no concurrent double run through crashes, restarts, failures and outages.

Each test breaks one real component — SIGKILL a worker, SIGKILL and restart the broker
(Redis without persistence, RabbitMQ with it), stop PostgreSQL or the broker, fail a task
body, name a task nobody registered — and then proves from the database that every entry
still ends processed (or dead with its reason), and that no entry's body ran twice at the
same time. Tests taking ``broker_url`` or ``private_broker`` run on Redis and on RabbitMQ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from reconcile_support import (
    WorkerFactory,
    make_policy,
    pending_count,
    retry_dead,
    sweep_connections,
    sweep_until,
    wait_for,
)

from celery_app.demo import audit, schema
from celery_reconciler import broker, ledger, planning, reconcile
from devstack import postgres as devstack_postgres
from devstack import rabbitmq as devstack_rabbitmq
from devstack import redis as devstack_redis

pytestmark = pytest.mark.integration

PrivateBroker = devstack_redis.RedisServer | devstack_rabbitmq.RabbitMQServer


def test_worker_killed_mid_task_loses_nothing_and_never_overlaps(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=40)
    for entry_id in range(1, 41):
        schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=0.5)
    policy = make_policy(lease_timeout="5s")
    victim = start_worker(broker_url=broker_url, dsn=demo_dsn, concurrency=2, lease_seconds=5)
    survivor = start_worker(broker_url=broker_url, dsn=demo_dsn, concurrency=2, lease_seconds=5)
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        assert reconcile.reconcile_once(policy, db=db, broker=publisher).published == 40

        def victim_is_mid_task() -> bool:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE finished_at IS NULL), count(*) FROM task_runs "
                "WHERE worker = %s",
                [victim.name],
            ).fetchone()
            return row is not None and row[0] >= 1 and row[1] >= 3

        wait_for(victim_is_mid_task, timeout_seconds=30, what="the victim worker mid-task")
        victim.kill()
        killed_at = {victim.name: audit.database_now(conn)}

    interrupted = conn.execute(
        "SELECT entry_id FROM task_runs WHERE worker = %s AND finished_at IS NULL",
        [victim.name],
    ).fetchall()
    assert interrupted, "the kill must interrupt at least one body"

    sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=90,
    )

    all_runs = audit.runs(conn)
    assert audit.overlapping_runs(all_runs, killed_at=killed_at) == []
    succeeded = [run for run in all_runs if run.outcome == "succeeded"]
    assert sorted(run.entry_id for run in succeeded) == list(range(1, 41))  # once each
    for (entry_id,) in interrupted:
        later = [run for run in succeeded if run.entry_id == entry_id]
        assert later and later[0].worker == survivor.name
    lost = {
        int(row[0])
        for row in conn.execute(
            "SELECT entry_id FROM celery_reconciler.attempts "
            "WHERE outcome = 'lost' AND worker = %s",
            [victim.name],
        )
    }
    # Each interrupted body cost its attempt. A body the kill caught between its ledger start
    # and its first write to task_runs is lost too, without a run row: never one that
    # finished on the victim.
    assert {entry_id for (entry_id,) in interrupted} <= lost
    assert not [run for run in succeeded if run.entry_id in lost and run.worker == victim.name]
    states = dict(
        conn.execute("SELECT state, count(*) FROM celery_reconciler.entries GROUP BY state")
    )
    assert states == {"succeeded": 40}


def test_a_broker_restart_loses_nothing(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    private_broker: PrivateBroker,
    start_worker: WorkerFactory,
) -> None:
    """The broker is SIGKILLed with most messages still queued, and started again.

    Redis without persistence comes back empty: the sweep finds the messages missing (or,
    at worst, their 4 s leases run out) and dispatches them again. RabbitMQ keeps its
    durable queue and every persistent message it confirmed: with a lease longer than the
    test, only those very messages can get the work done — and nothing is published twice.
    """
    on_redis = private_broker.url.startswith("redis")
    schema.seed(conn, count=200)
    for entry_id in range(1, 201):
        schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=0.03)
    lease_seconds = 4 if on_redis else 600
    policy = make_policy(lease_timeout=f"{lease_seconds}s")
    start_worker(
        broker_url=private_broker.url, dsn=demo_dsn, concurrency=1, lease_seconds=lease_seconds
    )
    with sweep_connections(demo_dsn, private_broker.url) as (db, publisher):
        assert reconcile.reconcile_once(policy, db=db, broker=publisher).published == 200
        wait_for(
            lambda: 200 - pending_count(conn) >= 10,
            timeout_seconds=30,
            what="the worker under way",
        )
        assert publisher.queue_depth("insights") > 50  # many messages are still queued ...
        private_broker.kill()
        private_broker.start()
        if on_redis:
            assert publisher.queue_depth("insights") == 0  # ... and gone: no RDB, no AOF
        else:
            assert publisher.queue_depth("insights") > 50  # ... and still there
    left_behind = pending_count(conn)
    assert left_behind > 50

    results = sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=private_broker.url,
        timeout_seconds=120,
        interval_seconds=0.5,
    )
    recovered = sum(result.expired.unstarted + result.missing_messages for result in results)
    if on_redis:
        # Their messages were found missing from the broker (or their lease ran out).
        assert recovered >= left_behind - 2
    else:
        assert recovered == 0 and sum(result.published for result in results) == 0
    all_runs = audit.runs(conn)
    assert audit.overlapping_runs(all_runs) == []
    assert sorted({run.entry_id for run in all_runs if run.outcome == "succeeded"}) == list(
        range(1, 201)
    )


def test_failing_entry_backs_off_within_jitter_bounds_dies_and_comes_back(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=3)
    schema.set_fault(conn, entry_id=2, kind="fail")
    policy = make_policy(
        lease_timeout="10s",
        retry={
            "maxAttempts": 4,
            "initialDelay": "400ms",
            "factor": 2,
            "maxDelay": "1s",
            "jitter": True,
        },
    )
    start_worker(broker_url=broker_url, dsn=demo_dsn, lease_seconds=10)

    def dead() -> bool:
        row = conn.execute(
            "SELECT state FROM celery_reconciler.entries WHERE entry_id = '2'"
        ).fetchone()
        return row is not None and row[0] == "dead"

    sweep_until(
        lambda: dead() and pending_count(conn) == 1,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=60,
        interval_seconds=0.1,
        what="entry 2 dead and the others processed",
    )

    history = ledger.history(conn, policy_key=policy.key, entry_id="2")
    assert history is not None
    assert history.state == "dead" and history.attempt == 4
    assert history.last_error == "DemoFailure: entry 2 is marked to fail in demo_faults"
    assert [a.outcome for a in history.attempts] == ["failed"] * 4
    for number, (failed, following) in enumerate(
        zip(history.attempts, history.attempts[1:], strict=False), start=1
    ):
        assert failed.retry_at is not None and failed.finished_at is not None
        delay = (failed.retry_at - failed.finished_at).total_seconds()
        low, high = planning.retry_delay_bounds_seconds(attempt=number, retry=policy.retry)
        assert low - 1e-6 <= delay <= high + 1e-6, (number, delay, low, high)
        assert following.started_at >= failed.retry_at  # never dispatched before it was due
    assert history.attempts[-1].retry_at is None  # the last failure dead-lettered
    assert len([run for run in audit.runs(conn) if run.entry_id == 2]) == 4

    # An explicit retry-dead, after the cause is fixed, brings it back and it succeeds.
    schema.clear_fault(conn, entry_id=2)
    assert retry_dead(policy, dsn=demo_dsn) == 1
    sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=policy,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=30,
        interval_seconds=0.1,
    )
    revived = ledger.history(conn, policy_key=policy.key, entry_id="2")
    assert revived is not None and revived.state == "succeeded" and revived.attempt == 1
    assert [a.outcome for a in revived.attempts] == ["failed"] * 4 + ["succeeded"]


def assert_no_secret(message: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in message


def test_database_down_is_a_clear_error_and_the_next_sweep_after_recovery_proceeds(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    postgres: devstack_postgres.PostgresServer,
    broker_url: str,
    start_worker: WorkerFactory,
) -> None:
    schema.seed(conn, count=30)
    policy = make_policy(lease_timeout="5s")
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        first = reconcile.reconcile_once(policy, db=db, broker=publisher)
        assert first.published == 30
        postgres.stop()
        try:
            with pytest.raises(reconcile.DatabaseUnavailable) as caught:
                reconcile.reconcile_once(policy, db=db, broker=publisher)
            message = str(caught.value)
            assert "PostgreSQL unavailable" in message
            assert f"127.0.0.1:{postgres.port}" in message  # names the server ...
            assert_no_secret(message, postgres.password, demo_dsn)  # ... not the secret
            with pytest.raises(reconcile.DatabaseUnavailable) as again:
                reconcile.reconcile_once(policy, db=db, broker=publisher)  # reconnect fails
            assert "connecting" in str(again.value)
            assert_no_secret(str(again.value), postgres.password, demo_dsn)
        finally:
            postgres.start()
        # The same Database object reconnects on the next sweep.
        assert reconcile.reconcile_once(policy, db=db, broker=publisher).published == 0

    start_worker(broker_url=broker_url, dsn=demo_dsn, lease_seconds=5)
    with psycopg.connect(demo_dsn, autocommit=True) as fresh:
        sweep_until(
            lambda: pending_count(fresh) == 0,
            policy_=policy,
            dsn=demo_dsn,
            broker_url=broker_url,
            timeout_seconds=60,
        )
        assert len({run.entry_id for run in audit.runs(fresh)}) == 30


def test_broker_down_is_a_clear_error_releases_claims_and_recovers(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    private_broker: PrivateBroker,
    start_worker: WorkerFactory,
) -> None:
    schema.seed(conn, count=25)
    policy = make_policy(lease_timeout="60s")  # recovery must not wait for this lease
    with sweep_connections(demo_dsn, private_broker.url) as (db, publisher):
        private_broker.stop()
        with pytest.raises(reconcile.BrokerUnavailable) as caught:
            reconcile.reconcile_once(policy, db=db, broker=publisher)
        message = str(caught.value)
        assert "broker unavailable while publishing to queue 'insights'" in message
        assert f":***@127.0.0.1:{private_broker.port}/" in message
        assert broker.redact_url(private_broker.url) in message
        assert_no_secret(message, private_broker.password)
        # Claimed, not published, and released: eligible for the very next sweep.
        counts = ledger.counts(conn, policy_key=policy.key)
        assert counts.queued == 25
        assert ledger.count_in_flight(conn, policy_key=policy.key) == 0
        private_broker.start()
        start_worker(broker_url=private_broker.url, dsn=demo_dsn, lease_seconds=60)
        after = reconcile.reconcile_once(policy, db=db, broker=publisher)
        assert after.published == 25
    wait_for(lambda: pending_count(conn) == 0, timeout_seconds=30, what="all processed")
    assert len(audit.runs(conn)) == 25


def test_unknown_task_name_is_recorded_clearly_and_recovers_after_the_fix(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=3)
    retry = {"maxAttempts": 2, "initialDelay": "200ms", "factor": 1, "maxDelay": "200ms"}
    wrong = make_policy(task_name="insights.tasks.extract_insight_task", retry=retry)
    worker = start_worker(broker_url=broker_url, dsn=demo_dsn)

    def all_dead() -> bool:
        return ledger.counts(conn, policy_key=wrong.key).dead == 3

    sweep_until(
        all_dead,
        policy_=wrong,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=30,
        interval_seconds=0.2,
        what="the misnamed entries dead-lettered",
    )
    errors = {row[0] for row in conn.execute("SELECT last_error FROM celery_reconciler.entries")}
    assert errors == {
        f"NotRegistered: no task named 'insights.tasks.extract_insight_task' is registered on "
        f"worker {worker.name} — fix spec.task.name or deploy workers that register it "
        "(then retry-dead)"
    }
    assert audit.runs(conn) == []  # no body ran
    assert pending_count(conn) == 3  # nothing lost: still pending in the table

    fixed = make_policy(retry=retry)
    assert retry_dead(fixed, dsn=demo_dsn) == 3
    sweep_until(
        lambda: pending_count(conn) == 0,
        policy_=fixed,
        dsn=demo_dsn,
        broker_url=broker_url,
        timeout_seconds=30,
    )
    assert len(audit.runs(conn)) == 3


def test_invalid_database_credentials_never_echo_the_dsn(
    postgres: devstack_postgres.PostgresServer, broker_url: str
) -> None:
    policy = make_policy()
    wrong_password = "not-the-password-4711"
    dsn = postgres.dsn.replace(postgres.password, wrong_password)
    garbage_dsn = f"postgresql://postgres:{wrong_password}@127.0.0.1:{postgres.port}/x?sslmode=b"
    publisher = broker.connect(broker_url)
    try:
        for candidate in (dsn, garbage_dsn, f"host= password={wrong_password} port='"):
            db = reconcile.Database(candidate)
            with pytest.raises(reconcile.DatabaseUnavailable) as caught:
                reconcile.reconcile_once(policy, db=db, broker=publisher)
            assert_no_secret(str(caught.value), wrong_password, candidate)
            assert_no_secret(repr(db), wrong_password)
    finally:
        publisher.close()


def test_pod_restart_hook_ends_the_dead_pods_incarnations_and_redispatches_at_once(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str, start_worker: WorkerFactory
) -> None:
    schema.seed(conn, count=6)
    for entry_id in range(1, 7):
        schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=3)
    # A lease far longer than the test: only the hook can explain a quick recovery.
    policy = make_policy(lease_timeout="5m")
    pod_uid = "0f1e2d3c-0000-4000-8000-000000000001"
    victim = start_worker(
        broker_url=broker_url,
        dsn=demo_dsn,
        concurrency=2,
        lease_seconds=300,
        extra_env={"CELERY_RECONCILER_POD_UID": pod_uid},
    )
    bystander = start_worker(
        broker_url=broker_url,
        dsn=demo_dsn,
        concurrency=1,
        lease_seconds=300,
        extra_env={"CELERY_RECONCILER_POD_UID": "0f1e2d3c-0000-4000-8000-000000000002"},
    )
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        reconcile.reconcile_once(policy, db=db, broker=publisher)

        def bodies_running_on(worker_name: str) -> int:
            row = conn.execute(
                "SELECT count(*) FROM task_runs WHERE worker = %s AND finished_at IS NULL",
                [worker_name],
            ).fetchone()
            return 0 if row is None else int(row[0])

        # The ledger says `running` as soon as a worker claims the entry, before the body has
        # written its task_runs row: under load a claimed body had not started yet when the
        # victim was killed. Wait until both of the victim's bodies (and the bystander's)
        # have really started, so the kill always cuts two bodies short.
        wait_for(
            lambda: (
                bodies_running_on(victim.name) == 2
                and bodies_running_on(bystander.name) == 1
                and ledger.counts(conn, policy_key=policy.key).running == 3
            ),
            timeout_seconds=30,
            what="three bodies running, two on the victim",
        )
        victim.kill()
        killed_at = {victim.name: audit.database_now(conn)}
        for (entry_id,) in conn.execute("SELECT entry_id FROM demo_faults").fetchall():
            schema.clear_fault(conn, entry_id=entry_id)

        rescued = reconcile.rescue(
            policy,
            db=db,
            broker=publisher,
            ending=planning.PodEnding(
                pod_uid=pod_uid, reason="its pod was deleted", whole_pod=True
            ),
        )
        # Re-dispatched now (ahead of the queue), not in 5 minutes; the bystander's body,
        # under another pod uid, keeps running.
        assert (rescued.expired.retry_now, rescued.expired.dead) == (2, 0)
        assert rescued.redispatched == 2
        assert ledger.counts(conn, policy_key=policy.key).running == 1

    rescued_entries = {
        row[0]
        for row in conn.execute(
            "SELECT entry_id FROM task_runs WHERE worker = %s AND finished_at IS NULL",
            [victim.name],
        )
    }
    assert len(rescued_entries) == 2
    wait_for(
        lambda: (
            rescued_entries
            <= {run.entry_id for run in audit.runs(conn) if run.outcome == "succeeded"}
        ),
        timeout_seconds=30,
        what="the rescued entries processed by the bystander",
    )
    assert audit.overlapping_runs(audit.runs(conn), killed_at=killed_at) == []
    reasons = {
        row[0]
        for row in conn.execute(
            "SELECT error FROM celery_reconciler.attempts WHERE outcome = 'lost'"
        )
    }
    assert reasons == {
        "the worker process running this attempt ended (its pod was deleted) on worker "
        + victim.name
    }
    assert bystander.process.running()


def test_dispatch_rate_paces_publishing(
    demo_dsn: str, conn: psycopg.Connection[Any], broker_url: str
) -> None:
    schema.seed(conn, count=250)
    policy = make_policy(limits={"batchSize": 500, "maxInFlight": 10000, "dispatchPerSecond": 100})
    now = [0.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:  # a simulated clock: no real waiting, no timing asserts
        pauses.append(seconds)
        now[0] += seconds

    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        result = reconcile.reconcile_once(
            policy, db=db, broker=publisher, sleep=sleep, clock=lambda: now[0]
        )
    assert result.published == 250
    assert result.pages == 3  # pages shrink to a second's worth: 100, 100, 50
    assert pauses == [1.0, 1.0]  # 100 sent at t=0, the next 100 at t=1, the last 50 at t=2


def test_deliveries_during_a_database_outage_go_back_to_the_queue_not_to_the_lease(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    postgres: devstack_postgres.PostgresServer,
    broker_url: str,
    start_worker: WorkerFactory,
) -> None:
    schema.seed(conn, count=5)
    policy = make_policy(lease_timeout="10m")
    with sweep_connections(demo_dsn, broker_url) as (db, publisher):
        assert reconcile.reconcile_once(policy, db=db, broker=publisher).published == 5
    postgres.stop()
    try:
        worker = start_worker(broker_url=broker_url, dsn=demo_dsn, lease_seconds=600)
        wait_for(
            lambda: "returning the delivery to the queue" in worker.log(),
            timeout_seconds=30,
            what="the worker to hand a delivery back while the ledger is unreachable",
        )
    finally:
        postgres.start()
    # No sweep runs from here on and the lease is 10 minutes: only the requeued deliveries
    # themselves can get the entries processed.
    with psycopg.connect(demo_dsn, autocommit=True) as fresh:
        wait_for(
            lambda: pending_count(fresh) == 0,
            timeout_seconds=60,
            what="the requeued deliveries to run once the database is back",
        )
        assert len(audit.runs(fresh)) == 5
        assert audit.overlapping_runs(audit.runs(fresh)) == []


def test_a_worker_without_the_ledger_dsn_refuses_to_start(redis_url: str, tmp_path: Path) -> None:
    """It could never pass a fence check: started anyway, it would look ready and hand every
    delivery back forever. It must stop at once and name what to set."""
    env = {key: value for key, value in os.environ.items() if key != "CELERY_RECONCILER_DSN"}
    env["CELERY_BROKER_URL"] = redis_url
    finished = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_app.demo", "worker", "-l", "INFO"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0, output
    assert "CELERY_RECONCILER_DSN is not set" in output
    assert " ready." not in output
