"""The operator as a real process against the real apiserver, database, broker and workers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from e2e_support import OperatorProcess, get_json, wait_for

from celery_app.demo import schema
from devstack import kube as devstack_kube
from devstack import processes, workers

WORKER_LABELS = {"app": "insights-worker"}


def secrets_manifest(*, dsn: str, broker_url: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "demo-db"},
                    "stringData": {"dsn": dsn},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "demo-broker"},
                    "stringData": {"url": broker_url},
                },
            ],
        }
    )


def policy_manifest(name: str = "journal-insights", **spec_overrides: Any) -> str:
    spec = schema.policy_spec(
        sweep_interval=spec_overrides.pop("sweep_interval", "30s"),
        lease_timeout=spec_overrides.pop("lease_timeout", "10m"),
        retry=spec_overrides.pop("retry", None),
    )
    spec["workers"] = {"podSelector": {"matchLabels": WORKER_LABELS}}
    spec.update(spec_overrides)
    return json.dumps(
        {
            "apiVersion": "celery-reconciler.io/v1alpha1",
            "kind": "ProcessingPolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def processingstatus_table(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, str]:
    """``kubectl get processingstatus`` as a person reads it: header -> value of the one row."""
    lines = kube.kubectl("-n", namespace, "get", "processingstatus").stdout.splitlines()
    if len(lines) < 2:
        return {}
    header = lines[0].split()
    return dict(zip(header, lines[1].split(), strict=False))


@pytest.fixture
def journal(database_dsn: str) -> str:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        schema.create_schema(conn)
    return database_dsn


def seed(dsn: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.seed(conn, count=count)


def unprocessed(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM journal_entry WHERE NOT insights_extracted")
        return int(row.fetchone()[0])  # type: ignore[index]


def body_runs(dsn: str) -> tuple[int, int]:
    """(runs, entries with more than one successful run) from the database's own record."""
    with psycopg.connect(dsn) as conn:
        runs = conn.execute("SELECT count(*) FROM task_runs").fetchone()
        doubled = conn.execute(
            "SELECT count(*) FROM (SELECT entry_id FROM task_runs WHERE outcome = 'succeeded' "
            "GROUP BY entry_id HAVING count(*) > 1) d"
        ).fetchone()
    assert runs is not None and doubled is not None
    return int(runs[0]), int(doubled[0])


@pytest.fixture
def worker_pods(
    crds: devstack_kube.ControlPlane, namespace: str, journal: str, redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., processes.ManagedProcess]]:
    started: list[processes.ManagedProcess] = []

    def start(pod_name: str, *, concurrency: int = 2) -> processes.ManagedProcess:
        crds.kubectl(
            "-n",
            namespace,
            "apply",
            "-f",
            "-",
            input=json.dumps(workers.pod_manifest(name=pod_name, labels=WORKER_LABELS)),
        )
        crds.kubectl(
            "-n",
            namespace,
            "patch",
            "pod",
            pod_name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(workers.running_status()),
        )
        worker = workers.start_worker(
            pod_name=pod_name,
            broker_url=redis_url,
            dsn=journal,
            log_dir=tmp_path,
            concurrency=concurrency,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_applying_a_policy_processes_every_entry_and_status_converges(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., processes.ManagedProcess],
) -> None:
    seed(journal, 300)
    worker_pods("insights-worker-a")
    worker_pods("insights-worker-b")
    start_operator()
    crds.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        input=secrets_manifest(dsn=journal, broker_url=redis_url),
    )
    crds.kubectl("-n", namespace, "apply", "-f", "-", input=policy_manifest())

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
    runs, doubled = body_runs(journal)
    assert (runs, doubled) == (300, 0)

    policy = get_json(crds, "-n", namespace, "get", "processingpolicy", "journal-insights")
    ready = {c["type"]: c for c in policy["status"]["conditions"]}["Ready"]
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

    def condition(kind: str) -> dict[str, Any]:
        policy = get_json(crds, "-n", namespace, "get", "processingpolicy", "journal-insights")
        found = {c["type"]: c for c in (policy.get("status") or {}).get("conditions", [])}
        return found.get(kind, {})

    degraded = wait_for(
        lambda: (c := condition("Degraded")).get("status") == "True" and c,
        timeout_seconds=30,
        what="Degraded=True",
    )
    assert degraded["reason"] == "SecretNotFound"
    assert 'secret "demo-db"' in degraded["message"]
    events = get_json(
        crds,
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=journal-insights",
    )
    assert any(e["reason"] == "SecretNotFound" for e in events["items"])

    crds.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        input=secrets_manifest(dsn=journal, broker_url=redis_url),
    )
    wait_for(
        lambda: condition("Ready").get("status") == "True",
        timeout_seconds=60,
        what="Ready=True after the Secret was created (no restart)",
    )
