"""A policy reads its Secrets through the operator's short cache only while it is healthy."""

from __future__ import annotations

from typing import Any

import pytest

from celery_app.demo import schema
from celery_reconciler import kube, loop, policy


def policy_loop() -> loop.PolicyLoop:
    return loop.PolicyLoop(namespace="ns", name="p", uid="u", body={"spec": {}})


def ages_asked(monkeypatch: pytest.MonkeyPatch, state: loop.PolicyLoop) -> list[float]:
    asked: list[float] = []

    def read_secret_value(**arguments: Any) -> str:
        asked.append(arguments["max_age_seconds"])
        if arguments["field"] == "spec.source.databaseSecretRef":
            return "postgresql://app@db.example:5432/app"
        return "redis://cache.example:6379/0"

    monkeypatch.setattr(kube, "read_secret_value", read_secret_value)
    state.read_secrets(policy.parse_policy(schema.policy_spec(), namespace="ns", name="p"))
    return asked


def test_a_healthy_policy_may_reuse_a_recent_read(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ages_asked(monkeypatch, policy_loop()) == [kube.SECRET_MAX_AGE_SECONDS] * 2


def test_a_failing_policy_reads_its_secrets_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    state = policy_loop()
    state.failures_in_a_row = 3
    assert ages_asked(monkeypatch, state) == [0.0, 0.0]
