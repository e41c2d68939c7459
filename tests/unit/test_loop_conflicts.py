"""The loop's view of conflicts: computed once per set of claims, not at every sweep."""

from __future__ import annotations

import pytest

from celery_reconciler import planning, policy
from celery_reconciler.loop import conflicts


def claim(name: str, created: str, *, table: str = "public.t") -> planning.PolicyClaim:
    spec = {
        "source": {
            "databaseSecretRef": {"name": "db"},
            "table": table,
            "pending": {"column": "done", "equals": False},
        },
        "task": {"name": "tasks.mark", "brokerSecretRef": {"name": "broker"}},
    }
    return planning.PolicyClaim(
        created=created, policy=policy.parse_policy(spec, namespace="ns", name=name)
    )


def test_unchanged_claims_reuse_the_answer_and_changed_ones_recompute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    computed: list[int] = []
    compute = planning.conflicts

    def counting_conflicts(claims: list[planning.PolicyClaim]) -> dict[str, planning.Conflict]:
        computed.append(len(claims))
        return compute(claims)

    monkeypatch.setattr(conflicts, "_CONFLICTS", {})
    monkeypatch.setattr(planning, "conflicts", counting_conflicts)
    older, younger = claim("a", "2026-01-01T00:00:00Z"), claim("b", "2026-01-02T00:00:00Z")
    claims = [older, younger]
    assert list(conflicts.conflicts_in("ns", claims)) == ["ns/b"]
    assert list(conflicts.conflicts_in("ns", iter(claims))) == ["ns/b"]
    assert computed == [2]

    # A policy changed (kopf's index holds a new claim for it): asked again.
    moved = claim("b", "2026-01-02T00:00:00Z", table="public.other")
    assert conflicts.conflicts_in("ns", [older, moved]) == {}
    # An equal but new claim object is asked again too: identity, not equality, is cheap.
    equal_but_new = claim("b", "2026-01-02T00:00:00Z")
    assert list(conflicts.conflicts_in("ns", [older, equal_but_new])) == ["ns/b"]
    assert conflicts.conflicts_in("ns", [older]) == {}
    assert computed == [2, 2, 2, 1]
