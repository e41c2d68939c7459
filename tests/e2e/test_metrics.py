"""/metrics scraped during a real run agrees with the ledger."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import redis
from e2e_support import (
    OperatorProcess,
    apply_policy,
    ledger_rows,
    metric_value,
    seed,
    unprocessed,
    wait_for,
)

from celery_app.demo import schema
from devstack import kube as devstack_kube
from devstack import workers

POLICY = "journal-insights"


def ledger_truth(dsn: str) -> dict[str, float]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """
            SELECT
              (SELECT count(*) FROM celery_reconciler.attempts),
              (SELECT count(*) FROM celery_reconciler.attempts WHERE outcome = 'succeeded'),
              (SELECT count(*) FROM celery_reconciler.attempts
                WHERE outcome IN ('failed', 'lost') AND retry_at IS NOT NULL),
              (SELECT count(*) FROM celery_reconciler.entries WHERE state = 'dead'),
              (SELECT count(*) FROM celery_reconciler.entries WHERE state IN ('queued', 'running'))
            """
        ).fetchone()
    assert row is not None
    names = ("dispatched", "succeeded", "retried", "dead_lettered", "in_flight")
    return dict(zip(names, (float(v) for v in row), strict=True))


def scraped(operator: OperatorProcess, namespace: str) -> dict[str, float]:
    text = operator.metrics_text()
    names = {
        "dispatched": "celery_reconciler_dispatched_total",
        "succeeded": "celery_reconciler_succeeded_total",
        "retried": "celery_reconciler_retried_total",
        "dead_lettered": "celery_reconciler_dead_lettered_total",
        "in_flight": "celery_reconciler_in_flight",
    }
    return {
        key: metric_value(text, metric, namespace=namespace, policy=POLICY)
        for key, metric in names.items()
    }


def test_counters_match_the_ledger(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., workers.WorkerPod],
) -> None:
    seed(journal, 30)
    with psycopg.connect(journal, autocommit=True) as conn:
        for entry_id in (5, 6):
            schema.set_fault(conn, entry_id=entry_id, kind="fail")
    worker_pods("insights-worker-a")
    operator = start_operator()
    apply_policy(
        crds,
        namespace,
        dsn=journal,
        broker_url=redis_url,
        sweep_interval="2s",
        retry={
            "maxAttempts": 3,
            "initialDelay": "1s",
            "factor": 2,
            "maxDelay": "2s",
            "jitter": False,
        },
    )
    wait_for(
        lambda: len(ledger_rows(journal, state="dead")) == 2 and unprocessed(journal) == 2,
        timeout_seconds=90,
        what="28 processed and 2 dead-lettered",
    )
    expected = {
        "dispatched": 34.0,
        "succeeded": 28.0,
        "retried": 4.0,
        "dead_lettered": 2.0,
        "in_flight": 0.0,
    }
    assert ledger_truth(journal) == expected
    # The counters trail the ledger by a settle window of a few seconds and one status tick.
    wait_for(
        lambda: scraped(operator, namespace) == expected,
        timeout_seconds=60,
        what=f"/metrics to agree with the ledger {expected}",
    )
    text = operator.metrics_text()
    assert f'celery_reconciler_sweep_duration_seconds_count{{namespace="{namespace}"' in text
    # Every message was consumed: the broker queue the gauge watches is empty, and says so.
    assert redis.Redis.from_url(redis_url).llen("insights") == 0
    assert f'celery_reconciler_queue_depth{{namespace="{namespace}",policy="{POLICY}"}} 0.0' in text
