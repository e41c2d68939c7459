"""The worker's timeouts from the environment: defaults, overrides and refusals."""

from __future__ import annotations

import pytest

from celery_reconciler_worker import incarnation, settings


def test_the_defaults_follow_the_heartbeat_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.HEARTBEAT_STATEMENT_TIMEOUT_VARIABLE, raising=False)
    monkeypatch.delenv(settings.HEARTBEAT_LOCK_TIMEOUT_VARIABLE, raising=False)
    assert settings.heartbeat_statement_timeout_seconds(heartbeat_timeout_seconds=20) == 4
    assert settings.heartbeat_lock_timeout_seconds(heartbeat_timeout_seconds=20) == 2


def test_the_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.HEARTBEAT_STATEMENT_TIMEOUT_VARIABLE, "5")
    monkeypatch.setenv(settings.HEARTBEAT_LOCK_TIMEOUT_VARIABLE, "0.5")
    assert settings.heartbeat_statement_timeout_seconds(heartbeat_timeout_seconds=20) == 5
    assert settings.heartbeat_lock_timeout_seconds(heartbeat_timeout_seconds=20) == 0.5


@pytest.mark.parametrize(
    ("statement", "lock", "variable"),
    [
        ("6", "", "STATEMENT_TIMEOUT"),
        ("0", "", "STATEMENT_TIMEOUT"),
        ("soon", "", "STATEMENT_TIMEOUT"),
        ("", "4.5", "LOCK_TIMEOUT"),
        ("3", "3.5", "LOCK_TIMEOUT"),
        ("", "-1", "LOCK_TIMEOUT"),
    ],
)
def test_a_value_that_would_outlast_the_self_fence_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, statement: str, lock: str, variable: str
) -> None:
    """At most a quarter of the heartbeat timeout for the statement, at most the statement
    timeout for the lock wait; above zero."""
    monkeypatch.setenv(settings.HEARTBEAT_STATEMENT_TIMEOUT_VARIABLE, statement)
    monkeypatch.setenv(settings.HEARTBEAT_LOCK_TIMEOUT_VARIABLE, lock)
    with pytest.raises(ValueError, match=variable):
        settings.heartbeat_statement_timeout_seconds(heartbeat_timeout_seconds=20)
        settings.heartbeat_lock_timeout_seconds(heartbeat_timeout_seconds=20)


@pytest.mark.parametrize("raw", ["0.5", "0", "-3", "3601", "nan", "twenty", "inf"])
def test_a_heartbeat_timeout_outside_one_second_to_an_hour_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv(incarnation.HEARTBEAT_TIMEOUT_VARIABLE, raw)
    with pytest.raises(ValueError, match=incarnation.HEARTBEAT_TIMEOUT_VARIABLE):
        incarnation.heartbeat_timeout_seconds()


@pytest.mark.parametrize(("raw", "seconds"), [("", 20.0), ("1", 1.0), ("3600", 3600.0)])
def test_the_heartbeat_timeout_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, seconds: float
) -> None:
    monkeypatch.setenv(incarnation.HEARTBEAT_TIMEOUT_VARIABLE, raw)
    assert incarnation.heartbeat_timeout_seconds() == seconds
