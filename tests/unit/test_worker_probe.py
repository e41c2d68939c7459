"""The worker container's liveness probe (``celery_reconciler_worker.probe``) on run
directories of live and gone workers."""

from __future__ import annotations

import os
from pathlib import Path

from celery_reconciler_worker import identity, probe, ticks


def test_the_probe_fails_on_a_silent_guardian_or_body_of_a_running_worker(tmp_path: Path) -> None:
    own = identity.process_start_ticks(os.getpid())
    assert own is not None
    running = tmp_path / f"worker-{os.getpid()}-{own}"
    gone = tmp_path / f"worker-{os.getpid()}-{own + 1}"
    for directory in (running, gone):
        directory.mkdir()
        ticks.Publisher(directory / ticks.GUARDIAN_FILE, pid=os.getpid(), start_ticks=own).publish(
            timeout_seconds=6.0, ticked_at=100.0, renewed_at=100.0, running=0
        )
    assert probe.problems(tmp_path, now=105.5) == []  # late, but within the timeout
    body = ticks.Publisher(ticks.body_file(running, os.getpid()), pid=os.getpid(), start_ticks=own)
    body.publish(timeout_seconds=6.0, ticked_at=98.0, renewed_at=98.0, running=1)
    # The directory of a worker that is gone never fails the probe.
    assert [line.split(":")[0] for line in probe.problems(tmp_path, now=105.5)] == [running.name]
    assert len(probe.problems(tmp_path, now=106.5)) == 2  # the guardian is silent too


def test_a_guardian_that_never_ticked_is_named_so(tmp_path: Path) -> None:
    own = identity.process_start_ticks(os.getpid())
    assert own is not None
    running = tmp_path / f"worker-{os.getpid()}-{own}"
    running.mkdir()
    # What the worker writes as it starts its guardian: its own pid, ticking once.
    ticks.write_whole(
        running / ticks.GUARDIAN_FILE,
        ticks.Tick(
            pid=os.getpid(), start_ticks=own, timeout_seconds=6.0, ticked_at=100.0,
            renewed_at=100.0, running=0, incarnations=(),
        ),
    )  # fmt: skip
    assert probe.problems(tmp_path, now=106.0) == []
    assert probe.problems(tmp_path, now=106.5) == [
        f"{running.name}: guardian silent for 6.5 s since it was started (it never ticked)"
    ]
