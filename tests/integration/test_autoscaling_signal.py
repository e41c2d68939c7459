"""The autoscaling signal: the KEDA sample's own query against a real ledger under load.

The query is read from ``manifests/samples/keda/scaledobject.yaml`` (and compared with the
chart's template), run as a database user holding nothing but what the sample says KEDA
needs — ``USAGE`` on our schema and ``SELECT`` on the view — and must return what should
drive the scaler: the policy's entries queued plus running, nothing else.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import conninfo
from reconcile_support import WorkerFactory, make_policy, pending_count, sweep_connections, wait_for

from celery_app.demo import schema
from celery_reconciler import ledger, reconcile

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "manifests" / "samples" / "keda" / "scaledobject.yaml"
CHART_TEMPLATE = (
    ROOT / "charts" / "celery-reconciler" / "templates" / "demo" / "worker-scaledobject.yaml"
)
SAMPLE_POLICY_KEY = "'default/journal-insights'"


def sample_query() -> str:
    documents = [doc for doc in yaml.safe_load_all(SAMPLE.read_text()) if doc]
    scaled = next(doc for doc in documents if doc["kind"] == "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    auth = next(doc for doc in documents if doc["kind"] == "TriggerAuthentication")
    assert auth["metadata"]["name"] == trigger["authenticationRef"]["name"]
    query: str = trigger["metadata"]["query"]
    assert SAMPLE_POLICY_KEY in query
    return query


def test_the_chart_renders_the_samples_query() -> None:
    query = sample_query().replace(SAMPLE_POLICY_KEY, "'%s/%s'")
    assert f'printf "{query}" .Release.Namespace' in CHART_TEMPLATE.read_text()


@pytest.fixture
def keda_dsn(demo_dsn: str, conn: psycopg.Connection[Any]) -> str:
    """A user with only the grants the sample documents (the ledger must exist first)."""
    ledger.ensure_schema(conn)
    password = secrets.token_urlsafe(12)
    conn.execute(f"CREATE ROLE keda LOGIN PASSWORD '{password}'")
    conn.execute("GRANT USAGE ON SCHEMA celery_reconciler TO keda")
    conn.execute("GRANT SELECT ON celery_reconciler.backlog TO keda")
    return conninfo.make_conninfo(demo_dsn, user="keda", password=password)


def test_the_sample_query_counts_what_waits_for_or_occupies_a_worker(
    demo_dsn: str,
    conn: psycopg.Connection[Any],
    redis_url: str,
    keda_dsn: str,
    start_worker: WorkerFactory,
) -> None:
    policy = make_policy(lease_timeout="10m")
    query = sample_query().replace(SAMPLE_POLICY_KEY, f"'{policy.key}'")
    other = make_policy(name="other-policy", lease_timeout="10m")

    def signal() -> int:
        with psycopg.connect(keda_dsn, autocommit=True) as keda:
            row = keda.execute(query).fetchone()
        assert row is not None
        return int(row[0])

    assert signal() == 0  # no policy row yet: still a number, never an empty result
    schema.seed(conn, count=40)
    for entry_id in (1, 2):  # the first two bodies hold their worker for a while
        schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=20)
    with sweep_connections(demo_dsn, redis_url) as (db, publisher):
        assert reconcile.reconcile_once(policy, db=db, broker=publisher).published == 40
        # Another policy's work on the same ledger is not this worker pool's (its rules
        # published as every sweep publishes them: the survey's first part).
        ledger.survey(conn, other, stranded_seconds=0.0)
        with conn.transaction():
            ledger.claim(
                conn,
                policy_key=other.key,
                entry_ids=["9001", "9002"],
                lease_seconds=600,
                still_pending=lambda candidates: set(candidates),
            )
    assert signal() == 40  # all queued, none started

    start_worker(broker_url=redis_url, dsn=demo_dsn, concurrency=3)  # one left for quick ones
    wait_for(
        lambda: pending_count(conn) == 2,
        timeout_seconds=60,
        what="the 38 quick entries processed while the two slow bodies run",
    )
    counts = ledger.counts(conn, policy_key=policy.key)
    assert (counts.queued, counts.running) == (0, 2)
    assert signal() == 2  # two bodies still occupy the workers
    wait_for(lambda: pending_count(conn) == 0, timeout_seconds=60, what="the slow bodies done")
    wait_for(lambda: signal() == 0, timeout_seconds=30, what="the signal back to zero")
