"""Which sweeps the operator's log reports at info level: those that did something."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from celery_reconciler import ledger, reconcile

IDLE = reconcile.SweepResult(
    policy_key="ns/p",
    suspended=False,
    expired=ledger.ExpiredLeases(retry_now=0, dead=0, unstarted=0),
    settled=0,
    missing_messages=0,
    in_flight_before=3,
    budget=10,
    pages=1,
    claimed=0,
    published=0,
    seconds_until_next_due=12.0,
    claim_seconds=0.001,
    publish_seconds=0.0,
    duration_seconds=0.002,
    pruned=ledger.Pruned(attempts=0, entries=0),
)


def test_a_sweep_that_found_nothing_to_do_is_idle() -> None:
    assert IDLE.idle


@pytest.mark.parametrize(
    "change",
    [
        {"published": 1, "claimed": 1},
        {"expired": ledger.ExpiredLeases(retry_now=1, dead=0, unstarted=0)},
        {"expired": ledger.ExpiredLeases(retry_now=0, dead=1, unstarted=0)},
        {"expired": ledger.ExpiredLeases(retry_now=0, dead=0, unstarted=1)},
        {"missing_messages": 1},
        {"settled": 1},
        {"pruned": ledger.Pruned(attempts=1, entries=0)},
        {"pruned": ledger.Pruned(attempts=0, entries=1)},
    ],
)
def test_a_sweep_that_did_something_is_not(change: dict[str, Any]) -> None:
    assert not dataclasses.replace(IDLE, **change).idle
