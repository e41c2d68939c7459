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


NOW = datetime.datetime(2026, 11, 25, 18, 0, tzinfo=datetime.UTC)
EARLIER = NOW - datetime.timedelta(minutes=10)


def container(
    name: str = "worker",
    restarts: int = 0,
    container_id: str | None = "a" * 64,
    started_at: datetime.datetime | None = EARLIER,
) -> planning.ContainerStatus:
    return planning.ContainerStatus(
        name=name, restart_count=restarts, container_id=container_id, started_at=started_at
    )


def test_a_pod_with_no_restart_ends_nothing() -> None:
    same = [container(), container("sidecar", restarts=2)]
    ending = planning.pod_ending(pod_uid="u1", old=same, new=same, deleted=False, phase="Running")
    assert ending is None


def test_a_new_pod_is_not_a_restart() -> None:
    ending = planning.pod_ending(
        pod_uid="u1", old=None, new=[container(restarts=3)], deleted=False, phase=None
    )
    assert ending is None


@pytest.mark.parametrize(("deleted", "phase"), [(True, "Running"), (False, "Failed")])
def test_a_deleted_or_finished_pod_ends_all_its_incarnations(deleted: bool, phase: str) -> None:
    ending = planning.pod_ending(
        pod_uid="u1", old=[container()], new=[container()], deleted=deleted, phase=phase
    )
    assert ending is not None and ending.whole_pod and ending.pod_uid == "u1"


def test_a_restart_ends_what_started_before_the_new_container() -> None:
    restarted_at = NOW - datetime.timedelta(seconds=6)
    new = [
        container(restarts=1, container_id="b" * 64, started_at=restarted_at),
        container("sidecar", container_id="c" * 64),
    ]
    ending = planning.pod_ending(
        pod_uid="u1",
        old=[container(), container("sidecar")],
        new=new,
        deleted=False,
        phase="Running",
    )
    assert ending is not None and not ending.whole_pod
    assert ending.restarted_containers == ("worker",)
    assert set(ending.running_container_ids) == {"b" * 64, "c" * 64}
    margin = datetime.timedelta(seconds=planning.POD_CLOCK_SKEW_MARGIN_SECONDS)
    assert ending.started_before == restarted_at - margin


def test_a_restarted_container_not_running_yet_ends_all_its_incarnations() -> None:
    waiting = container(restarts=1, container_id=None, started_at=None)
    ending = planning.pod_ending(
        pod_uid="u1", old=[container()], new=[waiting], deleted=False, phase="Running"
    )
    assert ending is not None
    assert ending.running_container_ids == ()
    assert ending.started_before is None  # not running: every incarnation of it is dead
    assert ending.single_container


def test_a_multi_container_pod_says_so() -> None:
    old = [container(), container("sidecar", container_id="c" * 64)]
    new = [container(), container("sidecar", restarts=1, container_id="d" * 64)]
    ending = planning.pod_ending(pod_uid="u1", old=old, new=new, deleted=False, phase="Running")
    assert ending is not None and ending.restarted_containers == ("sidecar",)
    assert not ending.single_container


def test_a_pod_without_uid_ends_nothing() -> None:
    ending = planning.pod_ending(
        pod_uid="", old=[container()], new=[container()], deleted=True, phase=None
    )
    assert ending is None


@given(
    counts=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 10), st.integers(0, 10)),
        max_size=3,
        unique_by=lambda item: item[0],
    )
)
def test_restarted_containers_property(counts: list[tuple[str, int, int]]) -> None:
    old = [container(name, before) for name, before, _ in counts]
    new = [container(name, after) for name, _, after in counts]
    expected = tuple(sorted(name for name, before, after in counts if after > before))
    ending = planning.pod_ending(pod_uid="u", old=old, new=new, deleted=False, phase="Running")
    assert (ending.restarted_containers if ending else ()) == expected


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
    assert not chores.may_change_in_flight and not chores.may_change_schedule


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
    assert chores.may_change_in_flight == (chores.expire_lost_attempts or chores.look_for_stranded)


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
