"""Status patches of one policy that wait for the writer are merged, not queued."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

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


def test_closing_writes_what_waits_and_leaves_no_writer_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(
        statuswriter.kube,
        "patch_policy_status",
        lambda **kw: written.append((kw["name"], kw["status"])),
    )

    async def scenario() -> list[asyncio.Task[Any]]:
        writer = statuswriter.StatusWriter()
        writer.submit(
            namespace="ns", name="p", owner_uid="u", policy_status={"phase": "x"}, processing=None
        )
        tasks = list(writer._tasks)
        await writer.close()
        return tasks

    tasks = asyncio.run(scenario())
    assert written == [("p", {"phase": "x"})]
    # kopf waits 5 s at exit for any task of ours still running: none may be.
    assert tasks and all(task.done() for task in tasks)
