"""What went wrong, as the condition a user reads: the one map from failures to reasons.

A sweep's failure becomes a condition reason with a message written for the user
(``SWEEP_ERRORS``); anything not in that map is a bug of ours, ``InternalError``, whose
traceback goes to the log once per kind of error and never with a secret in it
(``ErrorTranslator``). A sweep that worked can still be wrong about something: a pod watch
the API refuses, work held by a silent worker, or dispatched work no worker takes
(``HealthJudge``, the ``HEALTH_REASONS``). The CLI names its failures with the same map.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from celery_reconciler import (
    broker,
    conditions,
    kube,
    ledger,
    planning,
    pools,
    reconcile,
)
from celery_reconciler import policy as policy_module

# Every per-policy line of the operator's log names the loop as its source, as it did
# before the loop was split in parts: log filters on that name keep working.
logger = logging.getLogger("celery_reconciler.loop")

# The failures a sweep can meet, each with its condition reason; the first match wins, so
# a subclass comes before its base (``DsnInvalid`` is a ``DatabaseUnavailable``). Every
# message here was written for the user: it names the field to fix and holds no secret.
SWEEP_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (kube.SecretNotFound, conditions.SECRET_NOT_FOUND),
    (kube.SecretInvalid, conditions.SECRET_INVALID),
    (reconcile.DsnInvalid, conditions.SECRET_INVALID),
    (broker.BrokerUrlInvalid, conditions.SECRET_INVALID),
    (kube.KubernetesUnavailable, conditions.KUBERNETES_UNAVAILABLE),
    (pools.PoolExhausted, conditions.CONNECTION_POOL_EXHAUSTED),
    (ledger.TooManyConnections, conditions.TOO_MANY_CONNECTIONS),
    (reconcile.DatabaseUnavailable, conditions.DATABASE_UNAVAILABLE),
    (reconcile.LedgerPermissionDenied, conditions.LEDGER_PERMISSION_DENIED),
    (reconcile.BrokerUnavailable, conditions.BROKER_UNAVAILABLE),
    (reconcile.SourceInvalid, conditions.SOURCE_INVALID),
)
ERROR_MESSAGE_LIMIT = 500
# Problems a sweep that worked can report (``HealthJudge``); a status refresh between
# sweeps recomputes them, where it leaves a sweep's own failure for the next sweep.
HEALTH_REASONS = (
    conditions.WORKERS_NOT_CONSUMING,
    conditions.POD_WATCH_FAILED,
    conditions.HELD_BY_SILENT_WORKER,
)


def problem_of(error: BaseException, *, secrets: tuple[str, ...] = ()) -> conditions.Problem:
    """The condition for a failed sweep. Anything not in ``SWEEP_ERRORS`` is a bug of ours,
    ``InternalError``, whose message is sanitized of ``secrets`` since nobody wrote it for
    the user."""
    for kind, reason in SWEEP_ERRORS:
        if isinstance(error, kind):
            return conditions.Problem(reason, str(error))
    detail = ledger.sanitize_error(
        str(error).strip() or "no message", secrets=secrets, limit=ERROR_MESSAGE_LIMIT
    )
    return conditions.Problem(
        conditions.INTERNAL_ERROR,
        f"unexpected {type(error).__name__}: {detail} — a bug of celery-reconciler: please "
        "report it with the operator's log (it has the traceback); the loop retries with backoff",
    )


class ErrorTranslator:
    """``problem_of`` for one policy, and the traceback of an unexpected error in the log —
    once per kind of error, without the policy's secrets — since that one is a bug to
    report."""

    def __init__(self, *, policy_key: str, secrets: Callable[[], tuple[str, ...]]) -> None:
        self.policy_key = policy_key
        self.secrets = secrets
        self.errors_logged: set[type[BaseException]] = set()

    def problem_of(self, error: Exception) -> conditions.Problem:
        problem = problem_of(error, secrets=self.secrets())
        if problem.reason == conditions.INTERNAL_ERROR and type(error) not in self.errors_logged:
            self.errors_logged.add(type(error))
            trace = "".join(traceback.format_exception(error))
            logger.error(
                "policy %s: unexpected error, reported as %s (logged once):\n%s",
                self.policy_key,
                conditions.INTERNAL_ERROR,
                ledger.sanitize_error(trace, secrets=self.secrets(), limit=20_000),
            )
        return problem


class HealthJudge:
    """What a sweep that worked can still be wrong about: a pod watch the API refuses, work
    held by a silent worker process, or work that waits for workers that never take it.
    Whether workers are stuck is judged with hysteresis, so it keeps its last verdict."""

    def __init__(self) -> None:
        self.workers_stuck = False

    def problem(
        self,
        policy: policy_module.Policy,
        counts: reconcile.StatusSnapshot,
        *,
        pod_watch_failure: str | None,
        silent_held: str | None,
        broker_url: str | None,
    ) -> conditions.Problem | None:
        if pod_watch_failure is not None:
            return conditions.Problem(conditions.POD_WATCH_FAILED, pod_watch_failure)
        if silent_held is not None:
            return conditions.Problem(conditions.HELD_BY_SILENT_WORKER, silent_held)
        consumption = counts.consumption
        self.workers_stuck = planning.workers_not_consuming(
            oldest_queued_seconds=consumption.oldest_queued_seconds,
            running=counts.running,
            last_finished_seconds_ago=consumption.last_finished_seconds_ago,
            start_timeout_seconds=policy.workers.start_timeout_seconds,
            was_stuck=self.workers_stuck,
        )
        if not self.workers_stuck:
            return None
        queue, task = policy.task.queue, policy.task.name
        waited = int(consumption.oldest_queued_seconds or 0)
        on_broker = broker.describe_broker_url(broker_url or "")
        return conditions.Problem(
            conditions.WORKERS_NOT_CONSUMING,
            f"{counts.in_flight - counts.running} entries dispatched to queue {queue!r} on "
            f"{on_broker} wait for a worker (the oldest for {waited}s, "
            f"spec.workers.startTimeout is {policy.workers.start_timeout_seconds:g}s) and no "
            f"worker started any: check that a worker consumes queue {queue!r} on that same "
            f"broker (celery worker -Q {queue}; the celery command takes BROKER_URL from its "
            f"environment as --broker), has task {task!r} registered, and has "
            "CELERY_RECONCILER_DSN set",
        )
