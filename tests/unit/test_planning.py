"""Planning's pure decisions, with property tests for every documented bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_reconciler import planning, policy

unit_random = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@st.composite
def retry_policies(draw: st.DrawFn) -> policy.Retry:
    initial = draw(st.floats(min_value=0.0, max_value=3600.0))
    maximum = draw(st.floats(min_value=initial, max_value=86400.0))
    return policy.Retry(
        max_attempts=draw(st.integers(min_value=1, max_value=50)),
        initial_delay_seconds=initial,
        backoff_factor=draw(st.floats(min_value=1.0, max_value=100.0)),
        max_delay_seconds=maximum,
        jitter=draw(st.booleans()),
    )


SEED_RETRY = policy.Retry(
    max_attempts=5,
    initial_delay_seconds=60.0,
    backoff_factor=2.0,
    max_delay_seconds=3600.0,
    jitter=True,
)


def test_base_delay_doubles_then_caps() -> None:
    delays = [planning.base_retry_delay_seconds(attempt=n, retry=SEED_RETRY) for n in range(1, 10)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


def test_equal_jitter_bounds() -> None:
    assert planning.retry_delay_bounds_seconds(attempt=3, retry=SEED_RETRY) == (120.0, 240.0)
    no_jitter = policy.Retry(5, 60.0, 2.0, 3600.0, jitter=False)
    assert planning.retry_delay_bounds_seconds(attempt=3, retry=no_jitter) == (240.0, 240.0)


def test_random_source_spans_the_bounds() -> None:
    low = planning.retry_delay_seconds(attempt=2, retry=SEED_RETRY, random=lambda: 0.0)
    high = planning.retry_delay_seconds(attempt=2, retry=SEED_RETRY, random=lambda: 0.999999)
    assert low == 60.0 and 119.99 < high <= 120.0


@given(retry=retry_policies(), attempt=st.integers(min_value=1, max_value=10_000), r=unit_random)
def test_retry_delay_always_inside_its_bounds(retry: policy.Retry, attempt: int, r: float) -> None:
    low, high = planning.retry_delay_bounds_seconds(attempt=attempt, retry=retry)
    delay = planning.retry_delay_seconds(attempt=attempt, retry=retry, random=lambda: r)
    assert low <= delay <= high <= retry.max_delay_seconds
    assert low >= high * planning.RETRY_JITTER_LOW_FRACTION
    assert math.isfinite(delay)


@given(retry=retry_policies(), attempt=st.integers(min_value=1, max_value=200))
def test_base_delay_never_shrinks_as_attempts_grow(retry: policy.Retry, attempt: int) -> None:
    now = planning.base_retry_delay_seconds(attempt=attempt, retry=retry)
    later = planning.base_retry_delay_seconds(attempt=attempt + 1, retry=retry)
    assert later >= now


@given(retry=retry_policies(), attempt=st.integers(min_value=1, max_value=100), r=unit_random)
def test_dead_exactly_when_attempts_are_used_up(
    retry: policy.Retry, attempt: int, r: float
) -> None:
    decision = planning.after_failure(attempt=attempt, retry=retry, random=lambda: r)
    if attempt >= retry.max_attempts:
        assert decision == planning.DeadLetter(attempts_used=attempt)
    else:
        assert isinstance(decision, planning.RetryLater)
        low, high = planning.retry_delay_bounds_seconds(attempt=attempt, retry=retry)
        assert low <= decision.delay_seconds <= high


def test_attempts_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        planning.base_retry_delay_seconds(attempt=0, retry=SEED_RETRY)


@given(
    in_flight=st.integers(min_value=0, max_value=20_000),
    max_in_flight=st.integers(min_value=1, max_value=20_000),
    batch=st.integers(min_value=1, max_value=50_000),
)
def test_claims_never_exceed_max_in_flight_or_batch(
    in_flight: int, max_in_flight: int, batch: int
) -> None:
    budget = planning.sweep_claim_budget(in_flight=in_flight, max_in_flight=max_in_flight)
    assert budget >= 0 and in_flight + budget <= max(in_flight, max_in_flight)
    remaining, claimed = budget, 0
    while remaining > 0:
        size = planning.page_size(remaining_budget=remaining, batch_size=batch)
        assert 0 < size <= batch
        claimed += size
        remaining -= size
    assert claimed == budget


@given(interval=st.floats(min_value=0.01, max_value=86400.0), r=unit_random)
def test_sweep_wakeup_jitter_never_later_than_the_interval(interval: float, r: float) -> None:
    delay = planning.next_wakeup_seconds(
        sweep_interval_seconds=interval, earliest_retry_in_seconds=None, random=lambda: r
    )
    low, high = planning.sweep_delay_bounds_seconds(interval)
    assert low <= delay <= high == interval
    assert low == pytest.approx(interval * planning.SWEEP_JITTER_LOW_FRACTION)


@given(
    interval=st.floats(min_value=0.01, max_value=86400.0),
    due=st.floats(min_value=-1000.0, max_value=100000.0),
    r=unit_random,
)
def test_wakeup_comes_no_later_than_the_earliest_due_retry(
    interval: float, due: float, r: float
) -> None:
    delay = planning.next_wakeup_seconds(
        sweep_interval_seconds=interval, earliest_retry_in_seconds=due, random=lambda: r
    )
    assert 0.0 <= delay <= max(0.0, due)
    assert delay <= interval


@given(
    dispatched=st.integers(min_value=0, max_value=10**6),
    elapsed=st.floats(min_value=0.0, max_value=10**5),
    rate=st.floats(min_value=0.1, max_value=10**5),
)
def test_pacing_keeps_the_average_rate(dispatched: int, elapsed: float, rate: float) -> None:
    pause = planning.dispatch_pause_seconds(
        dispatched=dispatched, elapsed_seconds=elapsed, dispatch_per_second=rate
    )
    assert pause >= 0
    if dispatched:
        assert dispatched / (elapsed + pause) <= rate * (1 + 1e-9)


def test_unlimited_rate_never_pauses() -> None:
    assert (
        planning.dispatch_pause_seconds(dispatched=10**6, elapsed_seconds=0, dispatch_per_second=0)
        == 0
    )


@given(lease=st.floats(min_value=0.1, max_value=7 * 86400.0))
def test_time_limits_end_the_body_before_the_lease(lease: float) -> None:
    soft, hard = planning.task_time_limits_seconds(lease)
    assert 0 < soft < hard < lease
    assert hard >= lease / 2


def test_time_limit_margin_is_five_percent_but_at_least_two_seconds() -> None:
    assert planning.task_time_limits_seconds(900.0)[1] == pytest.approx(855.0)
    assert planning.task_time_limits_seconds(10.0)[1] == pytest.approx(8.0)
    assert planning.task_time_limits_seconds(2.0)[1] == pytest.approx(1.0)


def test_restarted_containers_are_those_whose_restart_count_rose() -> None:
    old = [{"name": "worker", "restartCount": 0}, {"name": "sidecar", "restartCount": 2}]
    new = [
        {"name": "worker", "restartCount": 1},
        {"name": "sidecar", "restartCount": 2},
        {"name": "late", "restartCount": 5},
    ]
    assert planning.restarted_containers(old, new) == ("worker",)
    assert planning.restarted_containers(None, new) == ()
    assert planning.restarted_containers(old, None) == ()


def test_pods_orphan_leases_when_deleted_finished_or_restarted() -> None:
    same = [{"name": "worker", "restartCount": 0}]
    assert not planning.pod_orphans_leases(old_statuses=same, new_statuses=same)
    assert planning.pod_orphans_leases(old_statuses=same, new_statuses=same, deleted=True)
    assert planning.pod_orphans_leases(old_statuses=same, new_statuses=same, phase="Failed")
    assert planning.pod_orphans_leases(
        old_statuses=same, new_statuses=[{"name": "worker", "restartCount": 1}]
    )


@given(
    counts=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 10), st.integers(0, 10)),
        max_size=3,
        unique_by=lambda item: item[0],
    )
)
def test_restarted_containers_property(counts: list[tuple[str, int, int]]) -> None:
    old = [{"name": name, "restartCount": before} for name, before, _ in counts]
    new = [{"name": name, "restartCount": after} for name, _, after in counts]
    expected = tuple(sorted(name for name, before, after in counts if after > before))
    assert planning.restarted_containers(old, new) == expected
