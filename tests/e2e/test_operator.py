"""The operator as a real process against the real apiserver, database, broker and workers."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import psycopg
from e2e_support import (
    OperatorProcess,
    apply_policy,
    apply_secrets,
    get_json,
    policy_conditions,
    policy_events,
    policy_manifest,
    processingstatus_table,
    seed,
    tally,
    unprocessed,
    wait_for,
)

from devstack import kube as devstack_kube
from devstack import postgres as devstack_postgres
from devstack import processes, workers


def test_applying_a_policy_processes_every_entry_and_status_converges(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 300)
    worker_pods("insights-worker-a")
    worker_pods("insights-worker-b")
    start_operator()
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url)

    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="all entries processed")
    table = wait_for(
        lambda: (t := processingstatus_table(crds, namespace)).get("SUCCEEDED") == "300" and t,
        timeout_seconds=60,
        what="kubectl get processingstatus to show 300 succeeded",
    )
    assert table["NAME"] == "journal-insights"
    assert table["PENDING"] == "0"
    assert table["IN-FLIGHT"] == "0"
    assert table["DEAD"] == "0"
    counted = tally(journal)
    assert (counted.processed, counted.runs, counted.duplicate_successes) == (300, 300, 0)

    policy = get_json(crds, "-n", namespace, "get", "processingpolicy", "journal-insights")
    ready = policy_conditions(policy)["Ready"]
    assert ready["status"] == "True"
    assert policy["status"]["observedGeneration"] == policy["metadata"]["generation"]


def test_a_missing_secret_degrades_the_policy_until_it_is_created(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    seed(journal, 5)
    start_operator()
    crds.kubectl("-n", namespace, "apply", "-f", "-", input=policy_manifest())

    degraded = wait_for(
        lambda: (c := policy_condition(crds, namespace, "Degraded")).get("status") == "True" and c,
        timeout_seconds=30,
        what="Degraded=True",
    )
    assert degraded["reason"] == "SecretNotFound"
    assert 'secret "demo-db"' in degraded["message"]
    events = policy_events(crds, namespace)
    assert any(e["reason"] == "SecretNotFound" for e in events)

    apply_secrets(crds, namespace, dsn=journal, broker_url=redis_url)
    wait_for(
        lambda: policy_condition(crds, namespace, "Ready").get("status") == "True",
        timeout_seconds=60,
        what="Ready=True after the Secret was created (no restart)",
    )


def test_secrets_never_reach_logs_status_or_events(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    db_password = urllib.parse.urlsplit(journal).password
    broker_password = urllib.parse.urlsplit(redis_url).password
    assert db_password and broker_password
    seed(journal, 20)
    worker_pods("insights-worker-a")
    operator = start_operator(extra_args=["--log-format=json"])
    # First a broker nobody listens on (with the real password in its URL), then the real one.
    closed_port = processes.free_port()
    dead_broker = f"redis://:{broker_password}@127.0.0.1:{closed_port}/0"
    apply_policy(crds, namespace, dsn=journal, broker_url=dead_broker)
    degraded = wait_for(
        lambda: (
            (c := policy_condition(crds, namespace, "Degraded")).get("reason")
            == "BrokerUnavailable"
            and c
        ),
        timeout_seconds=60,
        what="Degraded with reason BrokerUnavailable",
    )
    assert f"127.0.0.1:{closed_port}" in degraded["message"]
    apply_secrets(crds, namespace, dsn=journal, broker_url=redis_url)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=90,
        what="processing after the Secret was fixed",
    )
    wait_for(
        lambda: policy_condition(crds, namespace, "Ready").get("status") == "True",
        timeout_seconds=30,
        what="Ready again",
    )

    log = operator.process.log_path.read_text()
    sweep_lines = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and '"dispatched"' in line
    ]
    assert sweep_lines, "no structured sweep line in the JSON log"
    assert {"policy", "dispatched", "duration_seconds"} <= sweep_lines[0].keys()
    everything = "\n".join(
        [
            log,
            crds.kubectl(
                "-n", namespace, "get", "processingpolicy,processingstatus", "-o", "yaml"
            ).stdout,
            crds.kubectl("-n", namespace, "get", "events", "-o", "yaml").stdout,
        ]
    )
    assert "BrokerUnavailable" in everything
    assert db_password not in everything
    assert broker_password not in everything


def policy_condition(kube: devstack_kube.ControlPlane, namespace: str, kind: str) -> dict[str, Any]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", "journal-insights")
    return dict(policy_conditions(policy).get(kind, {}))


def test_a_database_outage_degrades_the_policy_and_it_recovers_by_itself(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    postgres: devstack_postgres.PostgresServer,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 10)
    worker_pods("insights-worker-a")
    start_operator()
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=60, what="the first entries")

    postgres.stop()
    try:
        degraded = wait_for(
            lambda: (
                (c := policy_condition(crds, namespace, "Degraded")).get("reason")
                == "DatabaseUnavailable"
                and c
            ),
            timeout_seconds=60,
            what="Degraded with reason DatabaseUnavailable",
        )
        assert postgres.password not in degraded["message"]
        assert policy_condition(crds, namespace, "Ready")["status"] == "False"
    finally:
        postgres.start()
    seed(journal, 5)
    wait_for(
        lambda: policy_condition(crds, namespace, "Ready").get("status") == "True",
        timeout_seconds=90,
        what="Ready again once the database is back",
    )
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=60,
        what="entries seeded after the outage to be processed",
    )
    reasons = [e["reason"] for e in policy_events(crds, namespace)]
    assert "DatabaseUnavailable" in reasons and "Recovered" in reasons
    assert tally(journal).duplicate_successes == 0


def test_a_policy_without_a_usable_index_carries_the_index_to_create(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    """The pending query reads the whole table when no index holds the predicate: the policy
    says so (condition Indexed=False, reason MissingIndex, an Event) and names the index.
    Running the statement it names, then editing the policy, clears it."""
    seed(journal, 20_000)
    with psycopg.connect(journal, autocommit=True) as conn:
        conn.execute("DROP INDEX journal_entry_pending")
        conn.execute("VACUUM ANALYZE journal_entry")
    start_operator()
    # Suspended: this test is about the plan, not about dispatching 20,000 entries.
    schedule = {"sweepInterval": "30s", "suspend": True}
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, schedule=schedule)

    def indexed() -> dict[str, Any]:
        policy = get_json(crds, "-n", namespace, "get", "processingpolicy", "journal-insights")
        return policy_conditions(policy).get("Indexed") or {}

    missing = wait_for(
        lambda: (c := indexed()).get("status") == "False" and c,
        timeout_seconds=60,
        what="Indexed=False",
    )
    assert missing["reason"] == "MissingIndex"
    statement = missing["message"].split("Create one: ", 1)[1]
    assert statement.startswith('CREATE INDEX CONCURRENTLY ON "public"."journal_entry"')
    assert any(e["reason"] == "MissingIndex" for e in policy_events(crds, namespace))

    with psycopg.connect(journal, autocommit=True) as conn:
        conn.execute(statement)
        conn.execute("ANALYZE journal_entry")
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        schedule={**schedule, "sweepInterval": "31s"},
    )
    used = wait_for(
        lambda: (c := indexed()).get("status") == "True" and c,
        timeout_seconds=60,
        what="Indexed=True once the advised index exists",
    )
    assert used["reason"] == "IndexUsed"
