"""``lastSweepTime`` rides on every status write: no write leaves it behind the last sweep.

An idle policy's status is written once per refresh period, so its ``lastSweepTime`` ages
between writes (that costs no writes to fix). But a write that happens anyway — the counts
moved between sweeps — must not carry an older sweep than the last one.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from celery_reconciler import ledger, loop, reconcile, statuswriter
from celery_reconciler.loop import status_report

POLICY_BODY = {
    "metadata": {"namespace": "ns", "name": "p", "uid": "uid-p", "generation": 1},
    "spec": {},
}


class RecordingWriter(statuswriter.StatusWriter):
    """Takes status submissions and keeps them (the PATCHes the loop would send)."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[dict[str, Any]] = []

    def submit(self, **fields: Any) -> None:
        self.submitted.append(fields)


def snapshot(*, in_flight: int) -> reconcile.StatusSnapshot:
    return reconcile.StatusSnapshot(
        pending=10,
        oldest_pending_seconds=5.0,
        in_flight=in_flight,
        retrying=0,
        succeeded=0,
        dead=0,
        seconds_until_next_due=None,
        running=in_flight,
        consumption=ledger.Consumption(oldest_queued_seconds=None, last_finished_seconds_ago=None),
        outcomes=ledger.Outcomes(
            succeeded=0, retried=0, dead_lettered=0, until=datetime.datetime.now(datetime.UTC)
        ),
    )


def idle_sweep() -> reconcile.SweepResult:
    return reconcile.SweepResult(
        policy_key="ns/p",
        suspended=False,
        expired=ledger.ExpiredLeases(retry_now=0, dead=0, unstarted=0),
        settled=0,
        missing_messages=0,
        in_flight_before=4,
        budget=0,
        pages=0,
        claimed=0,
        published=0,
        seconds_until_next_due=None,
        claim_seconds=0.0,
        publish_seconds=0.0,
        duration_seconds=0.01,
        pruned=ledger.Pruned(attempts=0, entries=0),
    )


def test_a_status_write_between_sweeps_carries_the_last_sweep_not_an_older_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The wall clock the loop reads: three sweeps 5 minutes apart (the 5m interval), then a
    # refresh a minute later.
    wall_clock = ["2026-12-07T10:00:00Z"]
    monkeypatch.setattr(status_report, "utc_now_text", lambda: wall_clock[0])
    writer = RecordingWriter()
    monkeypatch.setattr(statuswriter, "WRITER", writer)
    policy_loop = loop.PolicyLoop(namespace="ns", name="p", uid="uid-p", body=POLICY_BODY)

    async def reports() -> None:
        busy = snapshot(in_flight=4)
        # The first sweep is written; the next two changed nothing, so they write nothing
        # (the refresh period has not passed); then a worker finishes an entry and the
        # refresh between sweeps writes the counts.
        await policy_loop.reporter.show_outcome(
            policy=None, problem=None, generation=1, result=idle_sweep(), counts=busy
        )
        for later_sweep in ("2026-12-07T10:05:00Z", "2026-12-07T10:10:00Z"):
            wall_clock[0] = later_sweep
            await policy_loop.reporter.show_outcome(
                policy=None, problem=None, generation=1, result=idle_sweep(), counts=busy
            )
        wall_clock[0] = "2026-12-07T10:11:00Z"
        policy_loop.reporter.last_status_write -= status_report.STATUS_MIN_INTERVAL_SECONDS
        await policy_loop.reporter.show_outcome(
            policy=None, problem=None, generation=1, counts=snapshot(in_flight=3)
        )

    asyncio.run(reports())
    processing = [fields["processing"] for fields in writer.submitted]
    assert len(processing) == 2  # the same PATCHes as before: the first sweep, the refresh
    assert processing[0]["lastSweepTime"] == "2026-12-07T10:00:00Z"
    # The last sweep ran at 10:10; the refresh says so, at no extra write — not 10:00, two
    # sweep intervals behind it.
    assert processing[1].get("lastSweepTime") == "2026-12-07T10:10:00Z"
