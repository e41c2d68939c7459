"""The heartbeat's statement and lock timeouts: defaults, overrides and refusals."""

from __future__ import annotations

import pytest

from celery_reconciler_worker import settings


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
