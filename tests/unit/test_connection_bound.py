"""The operator's bound on database connections, and what a full server is reported as."""

from __future__ import annotations

import pytest

from celery_reconciler import conditions, ledger, pools
from celery_reconciler.loop import problems

DSN = "postgresql://app:s3cret-pw@db.example:5433/journal"


def test_a_fifth_of_the_bound_is_kept_for_the_pod_restart_hook() -> None:
    assert pools.split(20) == pools.Split(sweep=16, rescue=4)
    assert pools.split(2) == pools.Split(sweep=1, rescue=1)
    assert pools.split(7) == pools.Split(sweep=6, rescue=1)


def test_the_bound_comes_from_the_environment_or_the_default() -> None:
    assert pools.max_connections_from_env({}) == pools.DEFAULT_MAX_CONNECTIONS
    assert pools.max_connections_from_env({pools.MAX_CONNECTIONS_ENV: "35"}) == 35
    with pytest.raises(ValueError, match="whole number"):
        pools.max_connections_from_env({pools.MAX_CONNECTIONS_ENV: "many"})
    with pytest.raises(ValueError, match="at least 2"):
        pools.max_connections_from_env({pools.MAX_CONNECTIONS_ENV: "1"})


class _ServerError(Exception):
    def __init__(self, text: str, sqlstate: str | None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    "error",
    [
        _ServerError("FATAL:  sorry, too many clients already", None),
        _ServerError("FATAL:  remaining connection slots are reserved for superusers", None),
        _ServerError("refused", "53300"),
    ],
)
def test_a_full_server_is_its_own_reason_and_does_not_blame_the_dsn(error: Exception) -> None:
    failure = ledger.unavailable(error, dsn=DSN, doing="connecting")
    assert isinstance(failure, ledger.TooManyConnections)
    problem = problems.problem_of(failure)
    assert problem.reason == conditions.TOO_MANY_CONNECTIONS
    assert "max_connections" in problem.message
    assert "DSN (" not in problem.message
    assert "s3cret-pw" not in problem.message
    assert "db.example:5433" in problem.message


def test_other_refusals_still_point_at_the_server_and_the_dsn() -> None:
    failure = ledger.unavailable(_ServerError("connection refused", None), dsn=DSN, doing="x")
    assert not isinstance(failure, ledger.TooManyConnections)
    assert problems.problem_of(failure).reason == conditions.DATABASE_UNAVAILABLE


def test_a_policy_that_waited_too_long_for_a_slot_says_so() -> None:
    problem = problems.problem_of(pools.PoolExhausted("all 16 connections ..."))
    assert problem.reason == conditions.CONNECTION_POOL_EXHAUSTED
