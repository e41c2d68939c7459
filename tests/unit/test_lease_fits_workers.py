"""The loop flags a lease below the heartbeat timeout of the policy's workers (issue 22):
``loop.advice.PolicyAdvice.check_lease`` turns what the ledger's status read found into the
``LeaseFitsWorkers`` condition and one Warning Event. The ledger's half (which workers run
the policy's entries, and their timeout) is tested against PostgreSQL in
``tests/integration/test_source_and_ledger.py``."""

from __future__ import annotations

import asyncio
import datetime

from celery_app.demo import schema
from celery_reconciler import conditions, ledger, policy, reconcile
from celery_reconciler.loop import advice, events


def snapshot(*, heartbeat_timeout_seconds: float | None) -> reconcile.StatusSnapshot:
    return reconcile.StatusSnapshot(
        pending=0,
        oldest_pending_seconds=None,
        in_flight=1,
        retrying=0,
        succeeded=0,
        dead=0,
        seconds_until_next_due=None,
        running=1,
        consumption=ledger.Consumption(
            oldest_queued_seconds=None,
            last_finished_seconds_ago=None,
            workers_heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        ),
        outcomes=ledger.Outcomes(
            succeeded=0, retried=0, dead_lettered=0, until=datetime.datetime.now(datetime.UTC)
        ),
    )


def test_a_lease_below_the_workers_heartbeat_timeout_is_a_condition_and_one_warning() -> None:
    short = policy.parse_policy(schema.policy_spec(lease_timeout="5s"), namespace="n", name="p")
    fitting = policy.parse_policy(schema.policy_spec(lease_timeout="1m"), namespace="n", name="p")
    posted: list[tuple[str, str, str]] = []

    class RecordedEvents(events.PolicyEvents):
        async def post(self, event_type: str, reason: str, message: str) -> None:
            posted.append((event_type, reason, message))

    policy_advice = advice.PolicyAdvice(
        policy_key="n/p", events=RecordedEvents(namespace="n", name="p", uid="u")
    )

    asyncio.run(policy_advice.check_lease(short, snapshot(heartbeat_timeout_seconds=None)))
    assert policy_advice.lease_condition is None  # no worker seen yet: nothing to compare
    for _ in range(2):
        asyncio.run(policy_advice.check_lease(short, snapshot(heartbeat_timeout_seconds=20.0)))
    assert policy_advice.lease_condition is not None
    assert policy_advice.lease_condition[:3] == (
        conditions.LEASE_FITS_WORKERS,
        "False",
        conditions.LEASE_BELOW_HEARTBEAT_TIMEOUT,
    )
    assert [(kind, reason) for kind, reason, _ in posted] == [
        ("Warning", conditions.LEASE_BELOW_HEARTBEAT_TIMEOUT)
    ]
    # Idle (nothing running) keeps what was seen; a longer lease clears it.
    asyncio.run(policy_advice.check_lease(short, snapshot(heartbeat_timeout_seconds=None)))
    assert policy_advice.lease_condition[1] == "False"
    asyncio.run(policy_advice.check_lease(fitting, snapshot(heartbeat_timeout_seconds=None)))
    assert policy_advice.lease_condition[1] == "True"
    assert len(posted) == 1
