"""Status patches of one policy that wait for the writer are merged, not queued."""

from __future__ import annotations

from celery_reconciler import statuswriter


def pending(
    policy_status: dict[str, object] | None, processing: dict[str, object] | None
) -> statuswriter.PendingStatus:
    return statuswriter.PendingStatus("ns", "p", "uid", policy_status, processing)


def test_the_newer_value_of_a_field_wins_and_what_it_leaves_out_stays() -> None:
    waiting = pending({"conditions": ["old"], "lastSweepTime": "t1"}, {"pending": 5})
    waiting.absorb(pending(None, {"pending": 2, "inFlight": 3}))
    assert waiting.policy_status == {"conditions": ["old"], "lastSweepTime": "t1"}
    assert waiting.processing == {"pending": 2, "inFlight": 3}
    waiting.absorb(pending({"conditions": ["new"]}, None))
    assert waiting.policy_status == {"conditions": ["new"], "lastSweepTime": "t1"}


def test_what_merged_sweeps_dispatched_adds_up() -> None:
    waiting = pending(None, {"lastDispatched": 40, "pending": 60})
    waiting.absorb(pending(None, {"pending": 60}))  # a refresh between sweeps
    waiting.absorb(pending(None, {"lastDispatched": 60, "pending": 0}))
    assert waiting.processing == {"lastDispatched": 100, "pending": 0}
