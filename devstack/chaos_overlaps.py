"""When each chaos body run ended, and which runs of one entry overlapped: pure, over rows.

The chaos verdict (``devstack.chaos``) reads the bodies' own start/end rows (one PostgreSQL
clock, the host's) and the driver's record of what it did to the processes running them;
this module turns them into ``[start, end)`` intervals and counts the overlapping pairs, so
the counting can be tested on hand-made rows (``tests/unit/test_chaos_overlaps.py``).

A run that wrote its end row ended then. A run without one — its process was killed, froze
or held the GIL and never got to write it — ended when its process was known to be gone,
the earliest of:

* a **process end** after the run started: the worker's guardian logged that it killed (or
  saw the death of) that process of that Pod, or the driver saw that process gone (it
  polls every process of every worker Pod's cgroup, frozen or not);
* a **Pod kill** after the run started: the driver's SIGKILL of the Pod's container, noted
  once its main process was dead (the kernel kills the rest of the container with it).

A run with none of these never ended, as far as anyone can prove: it overlaps every later
run of its entry. Every bound is a moment at or after the real death (each is noted once the
process is seen gone), so an inferred end is never earlier than the truth, and an overlap is
never hidden by it.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import datetime
from collections.abc import Iterable, Sequence

NEVER = datetime.datetime.max.replace(tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Run:
    """One body run, as its own row recorded it (``finished_at`` None: no end row)."""

    run_id: int
    entry_id: int
    pod: str
    pid: int
    started_at: datetime.datetime
    finished_at: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class Interval:
    run: Run
    ended_at: datetime.datetime  # NEVER: no end row and no proof of the process's death
    inferred: bool  # the end is a death bound, not the run's own end row


class Endings:
    """The moments processes were known gone: by (Pod, pid), and whole Pods by their kills."""

    def __init__(
        self,
        *,
        pod_kills: Iterable[tuple[str, datetime.datetime]],
        process_ends: Iterable[tuple[str, int, datetime.datetime]],
    ) -> None:
        kills: dict[str, list[datetime.datetime]] = collections.defaultdict(list)
        for pod, at in pod_kills:
            kills[pod].append(at)
        ends: dict[tuple[str, int], list[datetime.datetime]] = collections.defaultdict(list)
        for pod, pid, at in process_ends:
            ends[(pod, pid)].append(at)
        self._kills = {pod: sorted(times) for pod, times in kills.items()}
        self._ends = {key: sorted(times) for key, times in ends.items()}

    def first_after(self, run: Run) -> datetime.datetime | None:
        """The first moment after the run's start at which its process was known gone."""
        found = [
            _first_after(self._kills.get(run.pod, []), run.started_at),
            _first_after(self._ends.get((run.pod, run.pid), []), run.started_at),
        ]
        known = [at for at in found if at is not None]
        return min(known) if known else None


def _first_after(
    times: Sequence[datetime.datetime], moment: datetime.datetime
) -> datetime.datetime | None:
    index = bisect.bisect_right(times, moment)
    return times[index] if index < len(times) else None


def intervals(runs: Iterable[Run], endings: Endings) -> list[Interval]:
    out = []
    for run in runs:
        if run.finished_at is not None:
            out.append(Interval(run=run, ended_at=run.finished_at, inferred=False))
        else:
            bound = endings.first_after(run)
            out.append(Interval(run=run, ended_at=bound or NEVER, inferred=True))
    return out


def overlapping_pairs(found: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Every pair of runs of one entry whose ``[start, end)`` intervals overlap, the earlier
    start first (ties: the lower run id)."""
    by_entry: dict[int, list[Interval]] = collections.defaultdict(list)
    for interval in found:
        by_entry[interval.run.entry_id].append(interval)
    pairs = []
    for entry in sorted(by_entry):
        ordered = sorted(by_entry[entry], key=lambda i: (i.run.started_at, i.run.run_id))
        for index, first in enumerate(ordered):
            for second in ordered[index + 1 :]:
                if second.run.started_at >= first.ended_at:
                    continue  # later runs may still overlap: ends are not ordered
                pairs.append((first, second))
    return pairs
