"""Retry backoff with jitter: the one rule both the worker and the operator apply.

A worker that sees a body fail schedules the retry itself (``after_failure``, then
``ledger.record_failure``), from the rules the operator last wrote to the ledger
(``ledger.retry_rules``); the operator's planning re-exports these functions for its own
decisions and for the bounds its docs and tests state. Living here keeps the worker free of
the operator package while the rule stays single.

**Equal jitter**: for the n-th failed attempt the base delay is
``d = min(maxDelay, initialDelay * factor**(n-1))`` and the jittered delay is uniform in
``[d * RETRY_JITTER_LOW_FRACTION, d]``. Full jitter (``[0, d]``) would let a poison entry
hammer the task again almost at once; equal jitter keeps at least half the backoff while
still spreading a thundering herd. Without jitter the delay is exactly ``d``.

Randomness is injected (``random`` is a ``() -> float in [0, 1)`` callable) so tests can pin
it. Pure: no I/O imports.
"""

from __future__ import annotations

import dataclasses
import random as random_module
from collections.abc import Callable

RETRY_JITTER_LOW_FRACTION = 0.5

RandomSource = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class Retry:
    """``spec.retry`` of a ProcessingPolicy, as the operator parsed it and workers read it."""

    max_attempts: int
    initial_delay_seconds: float
    backoff_factor: float
    max_delay_seconds: float
    jitter: bool


@dataclasses.dataclass(frozen=True)
class RetryLater:
    """The failed attempt gets another one after ``delay_seconds``."""

    delay_seconds: float


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """No attempts left: the entry is dead until someone asks for a retry."""

    attempts_used: int


FailureDecision = RetryLater | DeadLetter


def base_retry_delay_seconds(*, attempt: int, retry: Retry) -> float:
    """``min(maxDelay, initialDelay * factor**(attempt-1))`` for the ``attempt``-th failure."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    try:
        grown = retry.initial_delay_seconds * retry.backoff_factor ** (attempt - 1)
    except OverflowError:
        return retry.max_delay_seconds
    return min(retry.max_delay_seconds, grown)


def retry_delay_bounds_seconds(*, attempt: int, retry: Retry) -> tuple[float, float]:
    """The closed interval a jittered retry delay for ``attempt`` always falls in."""
    base = base_retry_delay_seconds(attempt=attempt, retry=retry)
    if not retry.jitter:
        return base, base
    return base * RETRY_JITTER_LOW_FRACTION, base


def retry_delay_seconds(
    *, attempt: int, retry: Retry, random: RandomSource = random_module.random
) -> float:
    low, high = retry_delay_bounds_seconds(attempt=attempt, retry=retry)
    return low + (high - low) * random()


def after_failure(
    *, attempt: int, retry: Retry, random: RandomSource = random_module.random
) -> FailureDecision:
    """What happens after the ``attempt``-th execution failed: retry later, or dead-letter."""
    if attempt >= retry.max_attempts:
        return DeadLetter(attempts_used=attempt)
    return RetryLater(
        delay_seconds=retry_delay_seconds(attempt=attempt, retry=retry, random=random)
    )
