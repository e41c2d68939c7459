"""Prometheus metrics of the operator, labelled by policy namespace and name.

Counters are incremented where the event happens (a sweep that dispatched, a rescue that
expired leases) rather than recomputed from the ledger, because Prometheus wants monotonic
counters; the gauges are set from the ledger's counts after each sweep, so they match what
``kubectl get processingstatus`` shows.
"""

from __future__ import annotations

import contextlib

import prometheus_client

LABELS = ("namespace", "policy")

DISPATCHED = prometheus_client.Counter(
    "celery_reconciler_dispatched_total", "Task messages published for claimed entries.", LABELS
)
SUCCEEDED = prometheus_client.Counter(
    "celery_reconciler_succeeded_total",
    "Entries whose task body succeeded (seen by sweeps).",
    LABELS,
)
RETRIED = prometheus_client.Counter(
    "celery_reconciler_retried_total",
    "Failed attempts scheduled for a retry (seen by sweeps).",
    LABELS,
)
DEAD_LETTERED = prometheus_client.Counter(
    "celery_reconciler_dead_lettered_total", "Entries that used up their attempts.", LABELS
)
RESCUED = prometheus_client.Counter(
    "celery_reconciler_rescued_total",
    "Running attempts handed out again at once: a pod event proved their worker process dead.",
    LABELS,
)
SWEEP_ERRORS = prometheus_client.Counter(
    "celery_reconciler_sweep_errors_total", "Sweeps that failed, by reason.", (*LABELS, "reason")
)
PENDING = prometheus_client.Gauge(
    "celery_reconciler_pending", "Entries matching the pending predicate, not in flight.", LABELS
)
IN_FLIGHT = prometheus_client.Gauge(
    "celery_reconciler_in_flight", "Entries queued or running under a lease.", LABELS
)
RETRYING = prometheus_client.Gauge(
    "celery_reconciler_retrying", "Entries waiting for a scheduled retry.", LABELS
)
DEAD = prometheus_client.Gauge("celery_reconciler_dead", "Dead-lettered entries.", LABELS)
OLDEST_PENDING_SECONDS = prometheus_client.Gauge(
    "celery_reconciler_oldest_pending_seconds", "Age of the oldest pending entry.", LABELS
)
QUEUE_DEPTH = prometheus_client.Gauge(
    "celery_reconciler_queue_depth",
    "Messages waiting in the policy's broker queue (shared by policies that use one queue); "
    "what an autoscaler such as KEDA scales workers on.",
    LABELS,
)
SWEEP_SECONDS = prometheus_client.Histogram(
    "celery_reconciler_sweep_duration_seconds",
    "Wall time of one sweep (expire, claim, publish).",
    LABELS,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


GAUGES = (PENDING, IN_FLIGHT, RETRYING, DEAD, OLDEST_PENDING_SECONDS, QUEUE_DEPTH)


def forget_gauges(namespace: str, name: str) -> None:
    """Drop a policy's gauges: another replica sweeps it now and reports them, and a stale
    copy here would add to its figures in every ``sum``."""
    for gauge in GAUGES:
        with contextlib.suppress(KeyError):  # never set by this replica
            gauge.remove(namespace, name)


def serve(*, port: int) -> None:
    # All interfaces: Prometheus scrapes the pod IP, not loopback.
    prometheus_client.start_http_server(port, addr="0.0.0.0")
