"""Planning's pure decisions, with property tests for every documented bound."""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any

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
        page = planning.page_plan(remaining_budget=remaining, batch_size=batch)
        assert 0 < page.claims <= page.rows == batch
        claimed += page.claims
        remaining -= page.claims
    assert claimed == budget
    assert planning.page_plan(remaining_budget=remaining, batch_size=batch).rows == 0


@given(
    remaining=st.integers(min_value=1, max_value=20_000),
    batch=st.integers(min_value=1, max_value=50_000),
)
def test_a_page_reads_a_whole_batch_however_few_slots_are_free(remaining: int, batch: int) -> None:
    page = planning.page_plan(remaining_budget=remaining, batch_size=batch)
    assert page.rows == batch
    assert page.claims == min(remaining, batch)


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


@pytest.mark.parametrize(
    ("due", "suspended", "early"),
    [
        (-3.0, False, True),  # a worker's heartbeat deadline passed since the sweep
        (0.0, False, True),
        (0.5, False, False),  # not yet: the refresh after next sees it
        (None, False, False),  # nothing queued, running or waiting
        (-3.0, True, False),  # a suspended policy dispatches nothing
    ],
)
def test_a_refresh_between_sweeps_sweeps_early_only_for_what_is_due(
    due: float | None, suspended: bool, early: bool
) -> None:
    assert planning.sweep_early(seconds_until_next_due=due, suspended=suspended) is early


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


NOW = datetime.datetime(2026, 11, 25, 18, 0, tzinfo=datetime.UTC)
EARLIER = NOW - datetime.timedelta(minutes=10)


def container(
    name: str = "worker",
    restarts: int = 0,
    container_id: str | None = "a" * 64,
    started_at: datetime.datetime | None = EARLIER,
    ended_ids: tuple[str, ...] = (),
    ended_started_at: datetime.datetime | None = None,
) -> planning.ContainerStatus:
    return planning.ContainerStatus(
        name=name,
        restart_count=restarts,
        container_id=container_id,
        started_at=started_at,
        ended_ids=ended_ids,
        ended_started_at=ended_started_at,
    )


def incarnation(
    key: str = "i1",
    *,
    container_id: str | None = None,
    container_name: str | None = None,
    container_started_at: datetime.datetime | None = None,
    started_at: datetime.datetime = EARLIER,
) -> planning.LiveIncarnation:
    return planning.LiveIncarnation(
        id=key,
        container_id=container_id,
        container_name=container_name,
        container_started_at=container_started_at,
        started_at=started_at,
    )


def ended_ids(
    *,
    new: list[planning.ContainerStatus],
    incarnations: list[planning.LiveIncarnation],
    old: list[planning.ContainerStatus] | None = None,
    deleted: bool = False,
    phase: str = "Running",
) -> set[str]:
    ending = planning.pod_ending(pod_uid="u1", old=old, new=new, deleted=deleted, phase=phase)
    assert ending is not None
    ended = planning.ended_incarnations(ending=ending, incarnations=incarnations)
    return {found.id for found in ended}


A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


@pytest.mark.parametrize(("deleted", "phase"), [(True, "Running"), (False, "Failed")])
def test_a_deleted_or_finished_pod_ends_all_its_incarnations(deleted: bool, phase: str) -> None:
    live = [incarnation("i1", container_id=A), incarnation("i2")]
    found = ended_ids(new=[container()], incarnations=live, deleted=deleted, phase=phase)
    assert found == {"i1", "i2"}


def test_a_pod_without_uid_ends_nothing() -> None:
    ending = planning.pod_ending(
        pod_uid="", old=[container()], new=[container()], deleted=True, phase=None
    )
    assert ending is None


def test_the_first_event_ends_the_instance_the_kubelet_reports_ended() -> None:
    """At the operator's start (no earlier event, no restartCount rise to see), the status
    alone proves the previous instance dead; the running one's process lives."""
    new = [container(restarts=1, container_id=B, started_at=NOW, ended_ids=(A,))]
    live = [incarnation("old", container_id=A), incarnation("new", container_id=B)]
    assert ended_ids(new=new, incarnations=live) == {"old"}


def test_a_young_process_of_a_restarted_container_is_ended_exactly() -> None:
    """Registered a moment before its container died: no clock margin spares it."""
    new = [container(restarts=1, container_id=B, started_at=NOW, ended_ids=(A,))]
    live = [incarnation("young", container_id=A, started_at=NOW + datetime.timedelta(seconds=3))]
    assert ended_ids(new=new, old=[container()], incarnations=live) == {"young"}


def test_an_instance_seen_running_before_and_not_now_ended() -> None:
    new = [container(restarts=2, container_id=C, started_at=NOW, ended_ids=(B,))]
    live = [incarnation("i1", container_id=A)]
    assert ended_ids(new=new, old=[container()], incarnations=live) == {"i1"}


def test_an_unknown_instance_is_left_to_its_silence() -> None:
    """Neither running nor reported ended: perhaps newer than this status (it lags the
    node), so only its silence, checked against the pod, may end it."""
    new = [container(restarts=2, container_id=C, started_at=NOW, ended_ids=(B,))]
    assert ended_ids(new=new, incarnations=[incarnation("i1", container_id=D)]) == set()


def test_a_container_not_running_ends_its_last_instance() -> None:
    waiting = container(restarts=1, container_id=A, started_at=None, ended_ids=(A,))
    live = [incarnation("i1", container_id=A)]
    assert ended_ids(new=[waiting], incarnations=live) == {"i1"}


def test_a_running_instance_is_never_ended_whatever_the_clocks() -> None:
    new = [container(container_id=A, started_at=NOW, ended_ids=(B,))]
    live = [incarnation("i1", container_id=A, started_at=NOW - datetime.timedelta(hours=1))]
    assert ended_ids(new=new, old=[container(restarts=0)], incarnations=live) == set()


def test_another_containers_instance_is_not_touched() -> None:
    new = [
        container(restarts=1, container_id=B, started_at=NOW, ended_ids=(A,)),
        container("sidecar", container_id=C),
    ]
    live = [incarnation("worker", container_id=A), incarnation("sidecar", container_id=C)]
    assert ended_ids(new=new, incarnations=live) == {"worker"}


def seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


@given(offset=st.floats(-3600, 3600, allow_nan=False))
def test_by_container_start_only_the_running_instances_window_lives(offset: float) -> None:
    """Both sides on the node's clock: the incarnation's container start ``c`` against the
    running instance's ``startedAt`` ``s``. Older than the window: ended; inside or newer
    (a status that lags the node): kept."""
    new = [container(container_id=None, started_at=NOW)]
    live = [incarnation("i1", container_started_at=NOW + seconds(offset))]
    found = ended_ids(new=new, incarnations=live)
    assert (found == {"i1"}) == (offset < -planning.CONTAINER_START_EARLIEST_SECONDS)


@given(
    true_start=st.floats(0, 100_000, allow_nan=False),
    create_gap=st.floats(0, 0.99, allow_nan=False),
    btime_error=st.floats(0, 0.999, allow_nan=False),
    truncate_again=st.booleans(),
)
def test_by_container_start_the_running_instance_always_lives(
    true_start: float, create_gap: float, btime_error: float, truncate_again: bool
) -> None:
    """The window holds every error the two readings can carry: PID 1 forked at task
    create (before start), ``btime`` whole seconds, the worker's reading perhaps truncated
    once more, the kubelet's ``startedAt`` truncated to whole seconds."""
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    started_at = base + seconds(float(int(true_start)))
    measured = true_start - create_gap - btime_error
    if truncate_again:
        measured = float(int(measured))
    new = [container(container_id=None, started_at=started_at)]
    live = [incarnation("i1", container_started_at=base + seconds(measured))]
    assert ended_ids(new=new, incarnations=live) == set()


@given(offset=st.floats(-3600, 3600, allow_nan=False))
def test_by_container_start_a_container_not_running_ends_its_last_and_older(
    offset: float,
) -> None:
    waiting = container(container_id=None, started_at=None, ended_started_at=NOW)
    live = [incarnation("i1", container_started_at=NOW + seconds(offset))]
    found = ended_ids(new=[waiting], incarnations=live)
    assert (found == {"i1"}) == (offset < planning.CONTAINER_START_LATEST_SECONDS)


def test_by_container_start_an_unnamed_process_of_a_multi_container_pod_is_not_guessed() -> None:
    new = [container(container_id=None, started_at=NOW), container("sidecar", started_at=NOW)]
    live = [incarnation("i1", container_started_at=NOW - seconds(600))]
    assert ended_ids(new=new, incarnations=live) == set()
    named = [incarnation("i1", container_name="worker", container_started_at=NOW - seconds(600))]
    assert ended_ids(new=new, incarnations=named) == {"i1"}


def test_legacy_needs_a_restart_count_rise_and_keeps_its_margin() -> None:
    """Neither id nor container start: only a restartCount rise between two events, and
    only processes registered before the new start with the clock margin to spare."""
    restarted_at = NOW - seconds(60)
    margin = seconds(planning.POD_CLOCK_SKEW_MARGIN_SECONDS)
    new = [container(restarts=1, container_id=B, started_at=restarted_at)]
    live = [
        incarnation("old", started_at=restarted_at - margin - seconds(1)),
        incarnation("young", started_at=restarted_at - margin + seconds(1)),
    ]
    assert ended_ids(new=new, old=[container()], incarnations=live) == {"old"}
    assert ended_ids(new=new, old=None, incarnations=live) == set()
    assert ended_ids(new=new, old=new, incarnations=live) == set()
    waiting = [container(restarts=1, container_id=A, started_at=None)]
    assert ended_ids(new=waiting, old=[container()], incarnations=live) == {"old", "young"}


@given(
    instances=st.lists(st.sampled_from([A, B, C, D]), min_size=1, max_size=4, unique=True),
    reported_ended=st.integers(0, 3),
    held=st.sampled_from([A, B, C, D]),
)
def test_by_container_id_property(instances: list[str], reported_ended: int, held: str) -> None:
    """A container ran ``instances`` in order; the last one runs. An incarnation in an
    instance ends iff it is not the running one and the status reports it ended."""
    *earlier, current = instances
    reported = tuple(earlier[-reported_ended:]) if reported_ended else ()
    new = [container(restarts=len(earlier), container_id=current, ended_ids=reported)]
    found = ended_ids(new=new, incarnations=[incarnation("i1", container_id=held)])
    assert (found == {"i1"}) == (held != current and held in reported)


def test_running_instances_ignore_restart_counts_and_waiting_containers() -> None:
    running = planning.running_instances([container(restarts=1), container("x", started_at=None)])
    assert running == planning.running_instances([container(restarts=5)])
    assert running != planning.running_instances([container(container_id=B)])


def silent(
    held: planning.LiveIncarnation, *, name: str | None = "w-1", namespace: str | None = "ns"
) -> planning.SilentIncarnation:
    return planning.SilentIncarnation(
        incarnation=held,
        pod_uid="u1",
        pod_name=name,
        pod_namespace=namespace,
        hostname="w-1",
        pid=7,
        silent_seconds=30.0,
    )


def found(*containers: planning.ContainerStatus, uid: str = "u1") -> planning.PodLookup:
    return planning.PodLookup(
        found=True, uid=uid, phase="Running", node_name="node-1", containers=containers
    )


@pytest.mark.parametrize(
    ("lookup", "why"),
    [
        (planning.PodLookup(found=False), "is gone"),
        (found(container(), uid="u2"), "replaced"),
        (dataclasses.replace(found(container()), phase="Failed"), "finished"),
        (found(container(container_id=B, started_at=NOW)), "no longer runs"),
        (found(container(container_id=A, started_at=None, ended_ids=(A,))), "ended"),
    ],
)
def test_a_silent_process_is_ended_only_on_its_pods_proof(
    lookup: planning.PodLookup, why: str
) -> None:
    verdict = planning.judge_silent(silent=silent(incarnation(container_id=A)), lookup=lookup)
    assert isinstance(verdict, planning.EndedIncarnation) and why in verdict.reason


@pytest.mark.parametrize(
    ("lookup", "says"),
    [
        (found(container(container_id=A)), "node-1"),  # same instance: perhaps only paused
        (planning.PodLookup(found=False, failure="HTTP 403 Forbidden"), "403"),
        (None, "CELERY_RECONCILER_POD_NAME"),
    ],
)
def test_a_silent_process_whose_death_is_not_proven_is_held_and_shown(
    lookup: planning.PodLookup | None, says: str
) -> None:
    verdict = planning.judge_silent(silent=silent(incarnation(container_id=A)), lookup=lookup)
    assert isinstance(verdict, planning.HeldIncarnation) and says in verdict.why
    summary = planning.held_summary([verdict])
    assert summary is not None and says in summary


def test_a_silent_process_of_the_running_instance_by_start_is_held() -> None:
    held = incarnation(container_started_at=NOW - seconds(1))
    verdict = planning.judge_silent(
        silent=silent(held), lookup=found(container(container_id=None, started_at=NOW))
    )
    assert isinstance(verdict, planning.HeldIncarnation)
    older = incarnation(container_started_at=NOW - seconds(60))
    verdict = planning.judge_silent(
        silent=silent(older), lookup=found(container(container_id=None, started_at=NOW))
    )
    assert isinstance(verdict, planning.EndedIncarnation)


def test_the_held_condition_does_not_churn() -> None:
    """Its text becomes a condition and an Event on change: no running figure in it."""
    first = planning.judge_silent(
        silent=silent(incarnation(container_id=A)), lookup=found(container(container_id=A))
    )
    later = planning.judge_silent(
        silent=dataclasses.replace(silent(incarnation(container_id=A)), silent_seconds=90.0),
        lookup=found(container(container_id=A)),
    )
    assert first == later


def _claim(
    name: str,
    created: str,
    *,
    table: str = "public.journal_entry",
    column: str = "insights_extracted",
    task: str = "insights.tasks.extract",
    secret: str = "db",
    namespace: str = "mindjourney",
) -> planning.PolicyClaim:
    spec = {
        "source": {
            "databaseSecretRef": {"name": secret},
            "table": table,
            "pending": {"column": column, "equals": False},
        },
        "task": {"name": task, "brokerSecretRef": {"name": "broker"}},
    }
    parsed = policy.parse_policy(spec, namespace=namespace, name=name)
    return planning.PolicyClaim(created=created, policy=parsed)


T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"


def test_the_younger_of_two_policies_on_the_same_table_and_predicate_yields() -> None:
    found = planning.conflicts([_claim("b", T2, task="other.task"), _claim("a", T1)])
    assert list(found) == ["mindjourney/b"]
    assert found["mindjourney/b"].winner == "mindjourney/a"
    assert "pending predicate" in found["mindjourney/b"].what


def test_same_task_and_table_conflicts_whatever_the_predicate_and_table_spelling() -> None:
    found = planning.conflicts(
        [_claim("a", T1, table="journal_entry"), _claim("b", T2, column="processed")]
    )
    assert found["mindjourney/b"].winner == "mindjourney/a"
    assert "task insights.tasks.extract" in found["mindjourney/b"].what


def test_a_tie_in_age_is_broken_by_name() -> None:
    assert list(planning.conflicts([_claim("b", T1), _claim("a", T1)])) == ["mindjourney/b"]


@pytest.mark.parametrize(
    "other",
    [
        {"table": "public.other_table"},
        {"table": "reporting.journal_entry"},
        {"secret": "other-db"},
        {"namespace": "elsewhere"},
        {"column": "processed", "task": "other.task"},
    ],
)
def test_policies_on_different_rows_do_not_conflict(other: dict[str, str]) -> None:
    assert planning.conflicts([_claim("a", T1), _claim("b", T2, **other)]) == {}


def test_a_policy_that_yields_blocks_nobody() -> None:
    # a and b share the task; b and c share the predicate; a and c share nothing.
    a = _claim("a", T1, column="processed")
    b = _claim("b", T2)
    c = _claim("c", T3, task="other.task")
    assert set(planning.conflicts([c, b, a])) == {"mindjourney/b"}
    assert planning.conflicts([c, b]) == {
        "mindjourney/c": planning.Conflict(
            loser="mindjourney/c",
            winner="mindjourney/b",
            what="same table public.journal_entry and pending predicate",
        )
    }


def _stuck(**overrides: Any) -> bool:
    arguments: dict[str, Any] = {
        "oldest_queued_seconds": 400.0,
        "running": 0,
        "last_finished_seconds_ago": None,
        "start_timeout_seconds": 180.0,
        "was_stuck": False,
    }
    arguments.update(overrides)
    return planning.workers_not_consuming(**arguments)


def test_work_queued_longer_than_the_start_timeout_with_nothing_running_is_stuck() -> None:
    assert _stuck()
    assert _stuck(last_finished_seconds_ago=181.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"oldest_queued_seconds": None},  # nothing waits
        {"oldest_queued_seconds": 179.0},  # not long enough yet
        {"running": 1},  # a worker is at it: a slow backlog, not a stuck one
        {"last_finished_seconds_ago": 30.0},  # work finished recently
        {"oldest_queued_seconds": None, "was_stuck": True},  # all taken: cleared
        {"running": 2, "was_stuck": True},  # work started again: cleared
    ],
)
def test_waiting_work_is_not_stuck_while_workers_take_some(overrides: dict[str, Any]) -> None:
    assert not _stuck(**overrides)


def test_a_lease_redispatch_does_not_clear_stuck_work() -> None:
    """Re-dispatched after its lease, the oldest entry looks fresh; nobody started it."""
    assert _stuck(oldest_queued_seconds=1.0, was_stuck=True)
    assert not _stuck(oldest_queued_seconds=1.0, was_stuck=False)


def scan(node_type: str, **fields: object) -> dict[str, object]:
    return {"Node Type": node_type, "Relation Name": "journal_entry", **fields}


def limited(*nodes: dict[str, object]) -> dict[str, object]:
    return {"Plan": {"Node Type": "Limit", "Plans": [{"Node Type": "Sort", "Plans": list(nodes)}]}}


@pytest.mark.parametrize(
    ("plan", "needs_index"),
    [
        (limited(scan("Seq Scan", Filter="(NOT insights_extracted)")), True),
        # An index on the keyset without the predicate: every processed row is read.
        (limited(scan("Index Scan", Filter="(NOT src.insights_extracted)")), True),
        (limited(scan("Bitmap Heap Scan", Filter="(insights_extracted = false)")), True),
        # A partial index that holds the predicate: no filter left.
        (limited(scan("Index Scan", **{"Index Name": "journal_entry_pending"})), False),
        (limited(scan("Index Only Scan")), False),
        # Another table's sequential scan is not ours to advise on.
        (limited({"Node Type": "Seq Scan", "Relation Name": "other"}), False),
    ],
)
def test_index_advice_reads_the_plan(plan: dict[str, object], needs_index: bool) -> None:
    assert (
        planning.page_needs_index(
            plan, relation="journal_entry", predicate_column="insights_extracted", table_rows=1e6
        )
        is needs_index
    )


def test_a_small_table_needs_no_index_advice() -> None:
    plan = limited(scan("Seq Scan", Filter="(NOT insights_extracted)"))
    assert not planning.page_needs_index(
        plan,
        relation="journal_entry",
        predicate_column="insights_extracted",
        table_rows=planning.INDEX_ADVICE_MIN_ROWS - 1,
    )


# --- the upkeep a sweep runs ----------------------------------------------------------------

NOTHING_TO_DO: dict[str, Any] = {
    "running": 0,
    "unsettled": 0,
    "due_retries": 0,
    "queued_a_while": 0,
    "unfolded": False,
    "history_expired": False,
    "silent_incarnations": False,
    "incarnations_expired": False,
}


def test_an_idle_ledger_needs_no_upkeep() -> None:
    chores = planning.sweep_chores(**NOTHING_TO_DO)
    assert not any(dataclasses.astuple(chores))
    assert not chores.may_change_in_flight(queue_audited=False)
    assert not chores.may_change_schedule(queue_audited=False)


@pytest.mark.parametrize(
    ("found", "chores"),
    [
        ({"silent_incarnations": True}, {"end_silent_incarnations"}),
        ({"unsettled": 3}, {"settle", "fold_successes"}),
        ({"due_retries": 1}, {"redispatch_due_retries"}),
        ({"queued_a_while": 2}, {"look_for_stranded"}),
        ({"unfolded": True}, {"fold_successes"}),
        ({"history_expired": True}, {"prune_history"}),
        ({"incarnations_expired": True}, {"prune_incarnations"}),
        # A running attempt may be lost: expired, it is a retry due now or a dead entry
        # (settled if the table shows it processed, then folded as a success).
        (
            {"running": 1},
            {"expire_lost_attempts", "settle", "fold_successes", "redispatch_due_retries"},
        ),
    ],
)
def test_each_kind_of_work_runs_its_chores(found: dict[str, Any], chores: set[str]) -> None:
    decided = planning.sweep_chores(**{**NOTHING_TO_DO, **found})
    assert {name for name, value in dataclasses.asdict(decided).items() if value} == chores


@given(
    running=st.integers(0, 3),
    unsettled=st.integers(0, 3),
    due_retries=st.integers(0, 3),
    queued_a_while=st.integers(0, 3),
    unfolded=st.booleans(),
    history_expired=st.booleans(),
    silent_incarnations=st.booleans(),
    incarnations_expired=st.booleans(),
)
def test_no_work_is_skipped(**found: Any) -> None:
    """Whatever the ledger holds, every chore with work to do runs, and so does every chore
    an earlier one may give work to."""
    chores = planning.sweep_chores(**found)
    assert chores.expire_lost_attempts == (found["running"] > 0)
    assert chores.settle >= (found["unsettled"] > 0 or chores.expire_lost_attempts)
    assert chores.fold_successes >= (found["unfolded"] or chores.settle)
    assert chores.redispatch_due_retries >= (
        found["due_retries"] > 0 or chores.expire_lost_attempts
    )
    for audited in (False, True):
        assert chores.may_change_in_flight(queue_audited=audited) == (
            chores.expire_lost_attempts or audited
        )
        assert chores.may_change_schedule(queue_audited=audited) >= audited


# --- the database's record of who processes what ---------------------------------------


def held(key: str, created: str, *, pending: str = "p", task: str = "t") -> planning.WorkHeld:
    return planning.WorkHeld(
        policy_key=key, policy_uid=f"uid-{key}", created=created, pending=pending, task_name=task
    )


def test_the_newer_of_two_policies_with_the_same_task_yields_whatever_their_namespaces() -> None:
    older = held("team-a/insights", "2026-01-01T00:00:00Z", pending="x")
    newer = held("team-b/insights", "2026-01-02T00:00:00Z", pending="y")
    assert planning.work_yields_to(older, [newer]) is None
    conflict = planning.work_yields_to(newer, [older])
    assert conflict == planning.Conflict(
        loser="team-b/insights", winner="team-a/insights", what="same table and task t"
    )


def test_the_same_predicate_with_another_task_is_the_same_work() -> None:
    older = held("a/one", "2026-01-01T00:00:00Z", task="one")
    newer = held("b/two", "2026-01-01T00:00:01Z", task="two")
    conflict = planning.work_yields_to(newer, [older])
    assert conflict is not None and conflict.what == "same table and pending predicate"


def test_another_task_with_another_predicate_on_one_table_is_other_work() -> None:
    one = held("a/one", "2026-01-01T00:00:00Z", pending="x", task="one")
    two = held("b/two", "2026-01-01T00:00:01Z", pending="y", task="two")
    assert planning.work_yields_to(two, [one]) is None
    assert planning.work_yields_to(one, [two]) is None


def test_creation_ties_are_broken_by_key_and_a_policy_that_yields_blocks_nobody() -> None:
    a = held("ns/a", "2026-01-01T00:00:00Z", pending="x", task="t1")
    b = held("ns/b", "2026-01-01T00:00:00Z", pending="x", task="t2")  # same rows as a
    c = held("ns/c", "2026-01-01T00:00:00Z", pending="z", task="t2")  # same task as b only
    assert planning.work_yields_to(a, [b, c]) is None
    assert planning.work_yields_to(b, [a, c]) is not None
    assert planning.work_yields_to(c, [a, b]) is None  # b yields, so it blocks nobody


def test_equal_predicates_have_equal_texts_and_different_ones_differ() -> None:
    flag = policy.PendingEquals(column="done", value=False)
    assert planning.pending_text(flag) == planning.pending_text(
        policy.PendingEquals(column="done", value=False)
    )
    others = [
        policy.PendingEquals(column="done", value=0),
        policy.PendingEquals(column="done", value="false"),
        policy.PendingIsNull(column="done", is_null=True),
        policy.PendingIn(column="done", values=("false",)),
    ]
    assert len({planning.pending_text(p) for p in [flag, *others]}) == 5


def test_a_sweep_resumes_where_the_last_one_ran_out_of_budget_within_one_interval() -> None:
    position = planning.BacklogPosition(key=(7,), pass_started=100.0)
    assert planning.sweep_resumes_at(None, now=100.0, sweep_interval_seconds=60.0) is None
    resumed = planning.sweep_resumes_at(position, now=159.9, sweep_interval_seconds=60.0)
    assert resumed == position
    # A pass one interval old starts over: rows that became pending ahead of the position
    # wait at most one sweep interval, as they would for a sweep.
    assert planning.sweep_resumes_at(position, now=160.0, sweep_interval_seconds=60.0) is None
