"""``loop.conflicts.owner_disagreement``: a refusal by the ledger's owner row is a takeover when
the policy's Lease names someone else, and a disagreement to show when the Lease still
names this replica (issue 22). The sharded run against a real apiserver and PostgreSQL is
``tests/e2e/test_forged_owner_row.py``; this checks the decision and its message."""

from __future__ import annotations

import asyncio

from celery_reconciler import conditions, ledger, sharding
from celery_reconciler.loop import conflicts

MINE = sharding.Fence("ns/p", "replica-a/1", 7)


def refusal(holder: str, token: int) -> ledger.FencedOut:
    return ledger.FencedOut("refused", current=sharding.Fence("ns/p", holder, token))


def disagreement(*, lease_backs: bool, refused: ledger.FencedOut) -> conditions.Problem | None:
    async def backs(fence: sharding.Fence) -> bool:
        assert fence == MINE
        return lease_backs

    return asyncio.run(
        conflicts.owner_disagreement(refused, policy_key="ns/p", fence=MINE, lease_backs=backs)
    )


def test_a_refusal_the_lease_does_not_back_is_a_takeover() -> None:
    assert disagreement(lease_backs=False, refused=refusal("replica-b/1", 8)) is None


def test_a_row_the_lease_does_not_back_is_shown_with_both_sides_and_the_holder_escaped() -> None:
    problem = disagreement(lease_backs=True, refused=refusal("evil/1\x1b[2J", 2**40))
    assert problem is not None
    assert problem.reason == conditions.OWNER_ROW_DISAGREES
    assert "evil/1" in problem.message and "\x1b" not in problem.message
    assert f"token {2**40}" in problem.message and "replica-a/1 (token 7)" in problem.message
    assert "celery-reconciler grants" in problem.message


def test_without_sharding_a_refusal_is_never_a_disagreement() -> None:
    without = conflicts.owner_disagreement(
        refusal("evil/1", 2**40), policy_key="ns/p", fence=None, lease_backs=None
    )
    assert asyncio.run(without) is None
