"""The chaos verdict's overlap count, over hand-made interval rows: it can fail.

The runs a frozen or GIL-bound body leaves often have no end row; these pin how such a run
is bounded (the first proof after its start that its process was gone) and that a pair of
runs of one entry whose ``[start, end)`` intervals meet is counted.
"""

from __future__ import annotations

import datetime

from devstack import chaos_overlaps
from devstack.chaos_overlaps import NEVER, Endings, Run

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def run(
    run_id: int, *, entry: int = 1, pod: str = "a", pid: int = 7, start: float, end: float | None
) -> Run:
    return Run(
        run_id=run_id,
        entry_id=entry,
        pod=pod,
        pid=pid,
        started_at=at(start),
        finished_at=None if end is None else at(end),
    )


def pairs(runs: list[Run], endings: Endings | None = None) -> list[tuple[int, int]]:
    found = chaos_overlaps.intervals(runs, endings or Endings(pod_kills=[], process_ends=[]))
    return [
        (first.run.run_id, second.run.run_id)
        for first, second in chaos_overlaps.overlapping_pairs(found)
    ]


def test_two_runs_of_one_entry_that_overlap_are_a_pair() -> None:
    assert pairs([run(1, start=0, end=5), run(2, pod="b", start=4, end=6)]) == [(1, 2)]


def test_runs_that_only_touch_or_belong_to_other_entries_are_not() -> None:
    assert pairs([run(1, start=0, end=5), run(2, start=5, end=6)]) == []
    assert pairs([run(1, entry=1, start=0, end=5), run(2, entry=2, start=1, end=6)]) == []


def test_a_long_first_run_overlaps_every_run_it_outlived() -> None:
    runs = [run(1, start=0, end=10), run(2, start=1, end=2), run(3, start=3, end=4)]
    assert pairs(runs) == [(1, 2), (1, 3)]


def test_a_frozen_run_that_wrote_its_end_late_overlaps_its_rescue() -> None:
    """Thawed after its entry re-ran elsewhere, it finished its body: its own row says so."""
    assert pairs([run(1, start=0, end=40), run(2, pod="b", start=20, end=21)]) == [(1, 2)]


def test_a_run_without_an_end_lasts_until_its_process_is_known_gone() -> None:
    frozen = run(1, pid=7, start=0, end=None)
    endings = Endings(pod_kills=[], process_ends=[("a", 7, at(30))])
    assert pairs([frozen, run(2, pod="b", start=20, end=21)], endings) == [(1, 2)]
    assert pairs([frozen, run(2, pod="b", start=31, end=32)], endings) == []


def test_only_its_own_process_or_a_kill_of_its_pod_ends_a_run() -> None:
    frozen = run(1, pod="a", pid=7, start=0, end=None)
    rescue = run(2, pod="b", start=20, end=21)
    other_process = Endings(pod_kills=[("b", at(1))], process_ends=[("a", 8, at(1))])
    assert pairs([frozen, rescue], other_process) == [(1, 2)]
    killed = Endings(pod_kills=[("a", at(10))], process_ends=[])
    assert pairs([frozen, rescue], killed) == []


def test_an_ending_before_the_run_started_is_someone_else_s() -> None:
    late = run(1, pid=7, start=10, end=None)
    endings = Endings(pod_kills=[("a", at(5))], process_ends=[("a", 7, at(9))])
    (interval,) = chaos_overlaps.intervals([late], endings)
    assert (interval.ended_at, interval.inferred) == (NEVER, True)
    assert pairs([late, run(2, pod="b", start=100, end=101)], endings) == [(1, 2)]
