from __future__ import annotations

from celery_reconciler import conditions


def test_a_problem_makes_the_policy_not_ready_and_degraded_with_its_reason() -> None:
    problem = conditions.Problem(conditions.SECRET_NOT_FOUND, 'secret "db" not found')
    updates = conditions.health(problem=problem, suspended=False, summary="")
    assert updates == (
        ("Ready", "False", "SecretNotFound", 'secret "db" not found'),
        ("Degraded", "True", "SecretNotFound", 'secret "db" not found'),
    )


def test_suspended_is_ready_but_says_why_nothing_is_dispatched() -> None:
    ready, degraded = conditions.health(problem=None, suspended=True, summary="x")
    assert ready[:3] == ("Ready", "True", "Suspended")
    assert degraded[:3] == ("Degraded", "False", "AsExpected")


def test_transition_time_moves_only_when_the_status_changes() -> None:
    first = conditions.merge(
        None,
        conditions.health(problem=None, suspended=False, summary="ok"),
        now="t1",
        generation=1,
    )
    same = conditions.merge(
        first,
        conditions.health(problem=None, suspended=False, summary="ok again"),
        now="t2",
        generation=2,
    )
    assert [c["lastTransitionTime"] for c in same] == ["t1", "t1"]
    assert [c["observedGeneration"] for c in same] == [2, 2]
    assert same[1]["message"] == "ok again"

    broken = conditions.merge(
        same,
        conditions.health(
            problem=conditions.Problem(conditions.DATABASE_UNAVAILABLE, "db down"),
            suspended=False,
            summary="",
        ),
        now="t3",
        generation=2,
    )
    assert {c["type"]: (c["status"], c["lastTransitionTime"]) for c in broken} == {
        "Degraded": ("True", "t3"),
        "Ready": ("False", "t3"),
    }


def test_other_condition_types_are_kept() -> None:
    existing = [{"type": "Custom", "status": "True", "lastTransitionTime": "t0"}]
    merged = conditions.merge(
        existing,
        conditions.health(problem=None, suspended=False, summary="ok"),
        now="t1",
        generation=1,
    )
    assert [c["type"] for c in merged] == ["Custom", "Degraded", "Ready"]
