"""Every reconcile decision that needs no I/O: backoff, jitter, budgets, wake-ups, orphans.

The operator loop, the worker integration and the CLI all ask this module *what* to do and
then do it through the adapters (``ledger``, ``source``, ``broker``). Keeping the decisions
pure means their bounds are proven by property tests in milliseconds, and the same rule is
applied on both sides: a retry delay computed by a worker for a failed body and the one a
user reads in the docs come from ``retry_delay_seconds``.

Jitter rules (documented here because tests and users rely on the bounds):

* **Retry backoff** uses "equal jitter": for the n-th failed attempt the base delay is
  ``d = min(maxDelay, initialDelay * factor**(n-1))`` and the jittered delay is uniform in
  ``[d * RETRY_JITTER_LOW_FRACTION, d]``. Full jitter (``[0, d]``) would let a poison entry
  hammer the task again almost at once; equal jitter keeps at least half the backoff while
  still spreading a thundering herd. Without jitter the delay is exactly ``d``. The bounds are
  ``retry_delay_bounds_seconds``.
* **Sweep interval** is uniform in ``[interval * SWEEP_JITTER_LOW_FRACTION, interval]`` so many
  policies with the same interval do not sweep in lock-step, and a sweep never comes later
  than the interval the user asked for. The bounds are ``sweep_delay_bounds_seconds``.

Randomness is injected (``random`` is a ``() -> float in [0, 1)`` callable) so tests can pin
it; the default is ``random.random``.

This module imports only ``policy`` (itself pure): no kopf, psycopg, celery or kubernetes.
"""

from __future__ import annotations

import dataclasses
import random as random_module
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from celery_reconciler import policy as policy_module

RETRY_JITTER_LOW_FRACTION = 0.5
SWEEP_JITTER_LOW_FRACTION = 0.9
# A lease shorter than this leaves no room for a hard time limit below it.
MIN_TIME_LIMIT_MARGIN_SECONDS = 2.0
TIME_LIMIT_MARGIN_FRACTION = 0.05
SOFT_TIME_LIMIT_FRACTION = 0.9

RandomSource = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class RetryLater:
    """The failed attempt gets another one after ``delay_seconds``."""

    delay_seconds: float


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """No attempts left: the entry is dead until someone asks for a retry."""

    attempts_used: int


FailureDecision = RetryLater | DeadLetter


def base_retry_delay_seconds(*, attempt: int, retry: policy_module.Retry) -> float:
    """``min(maxDelay, initialDelay * factor**(attempt-1))`` for the ``attempt``-th failure."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    try:
        grown = retry.initial_delay_seconds * retry.backoff_factor ** (attempt - 1)
    except OverflowError:
        return retry.max_delay_seconds
    return min(retry.max_delay_seconds, grown)


def retry_delay_bounds_seconds(*, attempt: int, retry: policy_module.Retry) -> tuple[float, float]:
    """The closed interval a jittered retry delay for ``attempt`` always falls in."""
    base = base_retry_delay_seconds(attempt=attempt, retry=retry)
    if not retry.jitter:
        return base, base
    return base * RETRY_JITTER_LOW_FRACTION, base


def retry_delay_seconds(
    *, attempt: int, retry: policy_module.Retry, random: RandomSource = random_module.random
) -> float:
    low, high = retry_delay_bounds_seconds(attempt=attempt, retry=retry)
    return low + (high - low) * random()


def after_failure(
    *, attempt: int, retry: policy_module.Retry, random: RandomSource = random_module.random
) -> FailureDecision:
    """What happens after the ``attempt``-th execution failed: retry later, or dead-letter."""
    if attempt >= retry.max_attempts:
        return DeadLetter(attempts_used=attempt)
    return RetryLater(
        delay_seconds=retry_delay_seconds(attempt=attempt, retry=retry, random=random)
    )


def sweep_claim_budget(*, in_flight: int, max_in_flight: int) -> int:
    """How many entries one sweep may still put in flight under ``maxInFlight``."""
    return max(0, max_in_flight - in_flight)


def page_size(*, remaining_budget: int, batch_size: int) -> int:
    """Entries to read and claim in the next page: never more than the budget left."""
    return max(0, min(batch_size, remaining_budget))


def sweep_delay_bounds_seconds(sweep_interval_seconds: float) -> tuple[float, float]:
    return sweep_interval_seconds * SWEEP_JITTER_LOW_FRACTION, sweep_interval_seconds


def next_wakeup_seconds(
    *,
    sweep_interval_seconds: float,
    earliest_retry_in_seconds: float | None,
    random: RandomSource = random_module.random,
) -> float:
    """Seconds until the per-policy loop should sweep again.

    The jittered sweep interval, or sooner when something in the ledger falls due first — a
    scheduled retry (retries are dispatched by the loop, never by Celery countdowns that die
    with a worker) or a lease deadline (``ledger.seconds_until_next_due``). Already due means
    "now" (0).
    """
    low, high = sweep_delay_bounds_seconds(sweep_interval_seconds)
    delay = low + (high - low) * random()
    if earliest_retry_in_seconds is not None:
        delay = min(delay, max(0.0, earliest_retry_in_seconds))
    return delay


def dispatch_pause_seconds(
    *, dispatched: int, elapsed_seconds: float, dispatch_per_second: float
) -> float:
    """How long to wait before publishing more, so ``dispatched`` stays under the rate.

    ``dispatch_per_second <= 0`` means unlimited. The pacing is cumulative over the sweep
    (``dispatched / rate`` seconds must have elapsed), so short bursts up to one page are
    allowed but the average never exceeds the rate.
    """
    if dispatch_per_second <= 0 or dispatched <= 0:
        return 0.0
    return max(0.0, dispatched / dispatch_per_second - elapsed_seconds)


def task_time_limits_seconds(lease_seconds: float) -> tuple[float, float]:
    """(soft, hard) Celery time limits that end a body before its running lease expires.

    The operator treats an expired running lease as a lost worker and re-dispatches; if the
    body were still running, two attempts would overlap. Sending a hard time limit below the
    lease in every message makes the prefork pool kill an overlong body first. The margin is
    5% of the lease, at least 2 s (the pool checks time limits about once a second), and at
    most half the lease.
    """
    margin = min(
        lease_seconds / 2,
        max(MIN_TIME_LIMIT_MARGIN_SECONDS, lease_seconds * TIME_LIMIT_MARGIN_FRACTION),
    )
    hard = lease_seconds - margin
    return hard * SOFT_TIME_LIMIT_FRACTION, hard


def restarted_containers(
    old_statuses: Iterable[Mapping[str, Any]] | None,
    new_statuses: Iterable[Mapping[str, Any]] | None,
) -> tuple[str, ...]:
    """Names of containers whose ``restartCount`` rose between two pod status snapshots.

    Takes the ``status.containerStatuses`` lists as the API returns them. A container that
    restarted lost whatever bodies it was running, so the leases its pod held are orphaned.
    A container absent from the old snapshot is not a restart (the pod just started).
    """
    before = {
        str(status.get("name")): int(status.get("restartCount") or 0)
        for status in old_statuses or ()
    }
    rose = [
        str(status.get("name"))
        for status in new_statuses or ()
        if str(status.get("name")) in before
        and int(status.get("restartCount") or 0) > before[str(status.get("name"))]
    ]
    return tuple(sorted(rose))


def pod_orphans_leases(
    *,
    old_statuses: Iterable[Mapping[str, Any]] | None,
    new_statuses: Iterable[Mapping[str, Any]] | None,
    deleted: bool = False,
    phase: str | None = None,
) -> bool:
    """Whether the leases held by a worker pod should be expired now.

    A pod that is deleted, finished (``Succeeded``/``Failed``) or whose container restarted
    runs none of the bodies it had claimed any more; waiting for the lease would only delay
    those entries.
    """
    if deleted or phase in ("Succeeded", "Failed"):
        return True
    return bool(restarted_containers(old_statuses, new_statuses))
