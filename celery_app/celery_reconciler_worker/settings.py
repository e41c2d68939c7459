"""The settings of a worker: Celery's (``recommended_settings``) and the heartbeat's own.

Users merge the Celery settings into their app with
``app.conf.update(reliable.recommended_settings(...))``; each says which failure it keeps
from losing or doubling work. The preset holds only settings the installed Celery knows:
Celery ignores an unknown key without a word, so a setting of a newer Celery would promise a
behaviour the user's worker does not have.

The heartbeat's statement and lock timeouts come from the worker's environment, like its
heartbeat timeout (``incarnation.heartbeat_timeout_seconds``): a slow database must fail a
heartbeat, which the next one retries, rather than hold it past the moment the watchdog
must act (``heartbeat_statement_timeout_seconds``).
"""

from __future__ import annotations

import os
from typing import Any

from celery.app import defaults

DEFAULT_LEASE_SECONDS = 15 * 60.0
# Redis re-queues an unacked message after the visibility timeout. Longer than the lease, a
# crashed worker's message comes back only after the operator already re-dispatched it (and
# fencing drops it); shorter, it would come back while its attempt may still be running.
VISIBILITY_TIMEOUT_LEASE_FACTOR = 1.5


def recommended_settings(*, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> dict[str, Any]:
    """Celery settings under which the ledger's guarantees hold; merge with ``conf.update``.

    * ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after
      the body, so a killed worker's message is redelivered (and fenced) instead of vanishing.
    * ``worker_prefetch_multiplier=1`` and ``worker_disable_prefetch`` (Redis): a worker
      takes a message only when a pool process is free, so a crash strands no unstarted
      messages behind their lease.
    * ``visibility_timeout`` = 1.5 x lease: see ``VISIBILITY_TIMEOUT_LEASE_FACTOR``.
    * JSON only: the operator publishes JSON messages.

    Retry timing is not a Celery setting here: it is ``spec.retry`` of the ProcessingPolicy,
    whose defaults mirror the seed's Celery settings (60 s initial delay, 5 attempts, jitter).
    ``worker_disable_prefetch`` is left out where the installed Celery lacks it (before 5.6);
    ``worker_prefetch_multiplier=1`` then bounds a crash's stranded messages to one per
    pool process.
    """
    settings: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": int(lease_seconds * VISIBILITY_TIMEOUT_LEASE_FACTOR) + 1
        },
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
    }
    if "worker_disable_prefetch" in defaults.DEFAULTS:
        # Take a message only when a pool process is free (Redis): a killed worker then
        # holds no prefetched messages that would wait out their lease.
        settings["worker_disable_prefetch"] = True
    return settings


RECOMMENDED_SETTINGS = recommended_settings()


HEARTBEAT_STATEMENT_TIMEOUT_VARIABLE = "CELERY_RECONCILER_HEARTBEAT_STATEMENT_TIMEOUT"
HEARTBEAT_LOCK_TIMEOUT_VARIABLE = "CELERY_RECONCILER_HEARTBEAT_LOCK_TIMEOUT"


def seconds_from_environment(
    variable: str, *, default: float, at_most: float, at_least: float | None = None
) -> float:
    """Seconds from ``$variable`` (``default`` when unset or empty); a value that is not a
    number, or outside (0 or ``at_least``, ``at_most``], stops the worker with the variable
    named: a typo here would otherwise change when bodies are killed."""
    raw = os.environ.get(variable)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    in_range = (value > 0.0 if at_least is None else value >= at_least) and value <= at_most
    if not in_range:
        lower = "above 0" if at_least is None else f"at least {at_least:g}"
        raise ValueError(f"{variable}={raw!r}: expected seconds {lower} and at most {at_most:g}")
    return value


def heartbeat_statement_timeout_seconds(*, heartbeat_timeout_seconds: float) -> float:
    """``statement_timeout`` of the heartbeat's statement: ``$CELERY_RECONCILER_HEARTBEAT_
    STATEMENT_TIMEOUT``, by default one heartbeat period (a fifth of the heartbeat timeout),
    so a heartbeat the database is slow to answer gives way to the next one on time; at
    most a quarter of the heartbeat timeout, so one slow statement never uses up the time
    the watchdog leaves the heartbeats to get through."""
    return seconds_from_environment(
        HEARTBEAT_STATEMENT_TIMEOUT_VARIABLE,
        default=heartbeat_timeout_seconds / 5,
        at_most=heartbeat_timeout_seconds / 4,
    )


def heartbeat_lock_timeout_seconds(*, heartbeat_timeout_seconds: float) -> float:
    """``lock_timeout`` of the heartbeat's statement: ``$CELERY_RECONCILER_HEARTBEAT_LOCK_
    TIMEOUT``, by default half the statement timeout — a heartbeat waiting for a row lock
    (a long transaction holding the incarnation's row, or a running entry's) fails and is
    retried instead of waiting its whole statement timeout; at most the statement timeout."""
    statement_timeout = heartbeat_statement_timeout_seconds(
        heartbeat_timeout_seconds=heartbeat_timeout_seconds
    )
    return seconds_from_environment(
        HEARTBEAT_LOCK_TIMEOUT_VARIABLE, default=statement_timeout / 2, at_most=statement_timeout
    )
