"""``spec.limits``: the page size of a sweep, how much may be in flight, and the dispatch
rate."""

from __future__ import annotations

from typing import Any

from celery_reconciler.policy import fields, records

DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_IN_FLIGHT = 10_000
MAX_BATCH_SIZE = 50_000
MAX_MAX_IN_FLIGHT = 10_000_000
MIN_DISPATCH_PER_SECOND = 0.01
MAX_DISPATCH_PER_SECOND = 1_000_000.0


def parse(value: Any, *, reader: fields.FieldReader) -> records.Limits:
    path = "spec.limits"
    raw = reader.mapping(value, path, allowed=("batchSize", "maxInFlight", "dispatchPerSecond"))
    batch_size = reader.integer(
        raw.get("batchSize", DEFAULT_BATCH_SIZE),
        f"{path}.batchSize",
        minimum=1,
        maximum=MAX_BATCH_SIZE,
    )
    problems_before = len(reader.problems)
    max_in_flight = reader.integer(
        raw.get("maxInFlight", DEFAULT_MAX_IN_FLIGHT),
        f"{path}.maxInFlight",
        minimum=1,
        maximum=MAX_MAX_IN_FLIGHT,
    )
    if len(reader.problems) == problems_before and batch_size > max_in_flight:
        reader.problem(
            f"{path}.batchSize",
            f"{batch_size} is larger than maxInFlight {max_in_flight}; a page can never "
            "exceed what may be in flight",
        )
    rate = raw.get("dispatchPerSecond", 0)
    return records.Limits(
        batch_size=batch_size,
        max_in_flight=max_in_flight,
        dispatch_per_second=0.0
        if rate == 0 and not isinstance(rate, bool)
        else reader.number(
            rate,
            f"{path}.dispatchPerSecond",
            minimum=MIN_DISPATCH_PER_SECOND,
            maximum=MAX_DISPATCH_PER_SECOND,
        ),
    )
