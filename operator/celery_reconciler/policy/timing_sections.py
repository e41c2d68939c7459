"""The spec's clocks: ``schedule`` (the sweep interval), ``retry`` (the backoff), ``lease``
(how long a claim lives) and ``history`` (how long the ledger keeps what finished).

The upper bounds keep every sum of "now" and a user's duration inside the range of a
timestamp (Python's datetime and PostgreSQL's timestamptz): the CRD says the same.
"""

from __future__ import annotations

from typing import Any

from celery_reconciler.policy import fields, records

DEFAULT_SWEEP_INTERVAL = "5m"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_INITIAL_DELAY = "60s"
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_MAX_DELAY = "1h"
DEFAULT_LEASE_TIMEOUT = "15m"
# Ledger history (finished attempts, succeeded rows) is kept a week, then pruned.
DEFAULT_HISTORY_RETENTION = "168h"
MIN_HISTORY_RETENTION_SECONDS = 60.0
MAX_ATTEMPTS_LIMIT = 1000
MIN_SWEEP_INTERVAL_SECONDS = 1.0
MAX_SWEEP_INTERVAL_SECONDS = 24 * 3600.0
MAX_DELAY_SECONDS = 7 * 24 * 3600.0
MAX_LEASE_SECONDS = 7 * 24 * 3600.0
MAX_HISTORY_RETENTION_SECONDS = 87600 * 3600.0  # ten years
MAX_BACKOFF_FACTOR = 100.0


def schedule(value: Any, *, reader: fields.FieldReader) -> records.Schedule:
    path = "spec.schedule"
    raw = reader.mapping(value, path, allowed=("sweepInterval", "suspend"))
    interval = raw.get("sweepInterval", DEFAULT_SWEEP_INTERVAL)
    seconds = reader.duration(
        interval, f"{path}.sweepInterval", maximum_seconds=MAX_SWEEP_INTERVAL_SECONDS
    )
    if 0 < seconds < MIN_SWEEP_INTERVAL_SECONDS:
        reader.problem(
            f"{path}.sweepInterval",
            f"{interval!r} is shorter than {MIN_SWEEP_INTERVAL_SECONDS:g}s; a sweep more "
            "often than that only loads the database (due retries wake the loop anyway)",
        )
    return records.Schedule(
        sweep_interval_seconds=max(seconds, MIN_SWEEP_INTERVAL_SECONDS),
        suspend=reader.boolean(raw.get("suspend", False), f"{path}.suspend"),
    )


def retry(value: Any, *, reader: fields.FieldReader) -> records.Retry:
    path = "spec.retry"
    raw = reader.mapping(
        value,
        path,
        allowed=("maxAttempts", "initialDelay", "factor", "maxDelay", "jitter"),
    )
    initial = reader.duration(
        raw.get("initialDelay", DEFAULT_INITIAL_DELAY),
        f"{path}.initialDelay",
        maximum_seconds=MAX_DELAY_SECONDS,
    )
    maximum = reader.duration(
        raw.get("maxDelay", DEFAULT_MAX_DELAY),
        f"{path}.maxDelay",
        maximum_seconds=MAX_DELAY_SECONDS,
    )
    if maximum < initial:
        reader.problem(
            f"{path}.maxDelay",
            f"{raw.get('maxDelay', DEFAULT_MAX_DELAY)!r} is shorter than initialDelay "
            f"{raw.get('initialDelay', DEFAULT_INITIAL_DELAY)!r}",
        )
    return records.Retry(
        max_attempts=reader.integer(
            raw.get("maxAttempts", DEFAULT_MAX_ATTEMPTS),
            f"{path}.maxAttempts",
            minimum=1,
            maximum=MAX_ATTEMPTS_LIMIT,
        ),
        initial_delay_seconds=initial,
        backoff_factor=reader.number(
            raw.get("factor", DEFAULT_BACKOFF_FACTOR),
            f"{path}.factor",
            minimum=1.0,
            maximum=MAX_BACKOFF_FACTOR,
        ),
        max_delay_seconds=max(maximum, initial),
        jitter=reader.boolean(raw.get("jitter", True), f"{path}.jitter"),
    )


def lease(value: Any, *, reader: fields.FieldReader) -> records.Lease:
    path = "spec.lease"
    raw = reader.mapping(value, path, allowed=("timeout",))
    return records.Lease(
        timeout_seconds=reader.duration(
            raw.get("timeout", DEFAULT_LEASE_TIMEOUT),
            f"{path}.timeout",
            maximum_seconds=MAX_LEASE_SECONDS,
        )
    )


def history(value: Any, *, reader: fields.FieldReader) -> records.History:
    path = "spec.history"
    raw = reader.mapping(value, path, allowed=("retention",))
    retention = reader.duration(
        raw.get("retention", DEFAULT_HISTORY_RETENTION),
        f"{path}.retention",
        maximum_seconds=MAX_HISTORY_RETENTION_SECONDS,
    )
    if retention < MIN_HISTORY_RETENTION_SECONDS:
        reader.problem(f"{path}.retention", "must be at least 1m")
    return records.History(retention_seconds=retention)
