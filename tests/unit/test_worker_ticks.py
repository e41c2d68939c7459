"""The tick record a body process publishes for its guardian and the probe (``ticks``), and
the guardian's rule for a silent one (``guardian.must_kill``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from celery_reconciler_worker import guardian, identity, ticks


def test_a_published_tick_reads_back_whole(tmp_path: Path) -> None:
    path = ticks.body_file(tmp_path, 4242)
    publisher = ticks.Publisher(path, pid=4242, start_ticks=99)
    assert ticks.read(path) is None  # nothing published yet
    listed = tuple(uuid.uuid4() for _ in range(ticks.MAX_INCARNATIONS + 2))
    publisher.publish(
        timeout_seconds=6.0, ticked_at=10.5, renewed_at=9.0, running=3, incarnations=listed
    )
    assert ticks.read(path) == ticks.Tick(
        pid=4242,
        start_ticks=99,
        timeout_seconds=6.0,
        ticked_at=10.5,
        renewed_at=9.0,
        running=3,
        incarnations=listed[: ticks.MAX_INCARNATIONS],
    )
    publisher.publish(timeout_seconds=6.0, ticked_at=11.0, renewed_at=9.0, running=0)
    tick = ticks.read(path)
    assert tick is not None and (tick.running, tick.incarnations) == (0, ())


def test_a_record_written_whole_reads_back_and_a_publisher_takes_it_over(tmp_path: Path) -> None:
    path = tmp_path / ticks.GUARDIAN_FILE
    listed = (uuid.uuid4(),)
    written = ticks.Tick(
        pid=7, start_ticks=70, timeout_seconds=6.0, ticked_at=1.5, renewed_at=1.0, running=2,
        incarnations=listed,
    )  # fmt: skip
    ticks.write_whole(path, written)
    assert ticks.read(path) == written
    assert [entry.name for entry in tmp_path.iterdir()] == [ticks.GUARDIAN_FILE]  # nothing staged
    ticks.Publisher(path, pid=8, start_ticks=80).publish(
        timeout_seconds=6.0, ticked_at=3.0, renewed_at=3.0, running=0
    )
    taken_over = ticks.read(path)
    assert taken_over is not None and (taken_over.pid, taken_over.ticked_at) == (8, 3.0)


def test_a_record_caught_mid_write_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "torn.tick"
    ticks.Publisher(path, pid=1, start_ticks=1).publish(
        timeout_seconds=6.0, ticked_at=1.0, renewed_at=1.0, running=1
    )
    data = bytearray(path.read_bytes())
    data[0] += 1  # an odd sequence number: a write in progress
    assert ticks.decode(bytes(data)) is None


def tick(*, running: int, ticked_at: float) -> ticks.Tick:
    return ticks.Tick(
        pid=1,
        start_ticks=1,
        timeout_seconds=6.0,
        ticked_at=ticked_at,
        renewed_at=ticked_at,
        running=running,
        incarnations=(),
    )


def test_the_guardian_kills_only_a_silent_process_that_runs_bodies() -> None:
    assert guardian.must_kill(tick(running=1, ticked_at=100.0), now=103.1)
    assert not guardian.must_kill(tick(running=1, ticked_at=100.0), now=102.9)
    assert not guardian.must_kill(tick(running=0, ticked_at=100.0), now=200.0)


def test_a_process_is_gone_once_its_pid_names_another_start_or_nothing() -> None:
    own = identity.process_start_ticks(os.getpid())
    assert own is not None
    assert not guardian.is_gone(os.getpid(), start_ticks=own)
    assert guardian.is_gone(os.getpid(), start_ticks=own + 1)
    assert guardian.is_gone(2**22 + 1, start_ticks=own)
