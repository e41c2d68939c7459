"""A policy reads its Secrets through the operator's short cache only while it is healthy,
and keeps the last value read while the API server does not answer."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import kubernetes
import pytest
import urllib3

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


class _FlakyApiServer:
    """Answers a Secret read with what ``answers`` holds next: data, or an error to raise."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)

    def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return kubernetes.client.V1Secret(data=answer)

    configuration = kubernetes.client.Configuration(host="https://apiserver.example:6443")


def read_twice(monkeypatch: pytest.MonkeyPatch, *answers: object) -> str:
    server = _FlakyApiServer(*answers)
    monkeypatch.setattr(kube, "_core", lambda: server)
    monkeypatch.setattr(kube, "_client", lambda: server)
    monkeypatch.setattr(kube, "_secrets_read", {})
    at = {"namespace": "ns", "name": "db", "key": "dsn", "field": "spec.source.databaseSecretRef"}
    first = ""
    with contextlib.suppress(kube.SecretNotFound):
        first = kube.read_secret_value(**at, max_age_seconds=0.0)
    second = kube.read_secret_value(**at, max_age_seconds=0.0)
    assert not first or second == first
    return second


DATA = {"dsn": base64.b64encode(b"postgresql://app@db.example/app").decode()}
UNREACHABLE = urllib3.exceptions.MaxRetryError(None, "/", "Connection refused")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "failure",
    [
        UNREACHABLE,
        kubernetes.client.ApiException(status=503, reason="Service Unavailable"),
        kubernetes.client.ApiException(status=429, reason="Too Many Requests"),
    ],
)
def test_a_secret_read_before_stands_while_the_api_server_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    assert read_twice(monkeypatch, DATA, failure) == "postgresql://app@db.example/app"


def test_a_refusal_is_not_an_outage_the_last_value_does_not_stand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(kube.KubernetesUnavailable, match="HTTP 403"):
        read_twice(
            monkeypatch, DATA, kubernetes.client.ApiException(status=403, reason="Forbidden")
        )


@pytest.mark.parametrize("before", [kubernetes.client.ApiException(status=404), UNREACHABLE])
def test_without_a_value_read_before_an_outage_fails_the_read(
    monkeypatch: pytest.MonkeyPatch, before: Exception
) -> None:
    with pytest.raises(kube.KubernetesUnavailable):
        read_twice(monkeypatch, before, UNREACHABLE)
