"""What the demo's own database says about how often each entry's task body ran.

Every body run is recorded in ``task_runs`` before it does anything, so these answers come
from the database, not from anyone's memory: the tests and ``make demo`` use them to prove
"processed exactly once" and "never two runs of one entry at the same time".
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

NEVER = datetime.datetime.max.replace(tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Run:
    entry_id: int
    task_id: str
    worker: str
    started_at: datetime.datetime
    finished_at: datetime.datetime | None
    outcome: str | None


@dataclasses.dataclass(frozen=True)
class Tally:
    entries: int
    processed: int
    runs: int
    duplicate_successes: int  # entries whose body succeeded more than once


def runs(conn: psycopg.Connection[Any]) -> list[Run]:
    rows = conn.execute(
        "SELECT entry_id, task_id, worker, started_at, finished_at, outcome FROM task_runs "
        "ORDER BY entry_id, started_at"
    ).fetchall()
    return [Run(*row) for row in rows]


def tally(conn: psycopg.Connection[Any]) -> Tally:
    row = conn.execute(
        """
        SELECT (SELECT count(*) FROM journal_entry),
               (SELECT count(*) FROM journal_entry WHERE insights_extracted),
               (SELECT count(*) FROM task_runs),
               (SELECT count(*) FROM (SELECT entry_id FROM task_runs
                                      WHERE outcome = 'succeeded'
                                      GROUP BY entry_id HAVING count(*) > 1) AS doubled)
        """
    ).fetchone()
    assert row is not None
    return Tally(*(int(value) for value in row))


def overlapping_runs(
    all_runs: Sequence[Run], *, killed_at: Mapping[str, datetime.datetime] | None = None
) -> list[tuple[Run, Run]]:
    """Pairs of runs of the same entry whose intervals overlap.

    A run without ``finished_at`` belongs to a killed worker: it ended when that worker was
    killed (``killed_at[worker]``); if its worker was never killed it is still running, and
    ends "never".
    """

    def end(run: Run) -> datetime.datetime:
        if run.finished_at is not None:
            return run.finished_at
        return (killed_at or {}).get(run.worker, NEVER)

    by_entry: dict[int, list[Run]] = {}
    for run in all_runs:
        by_entry.setdefault(run.entry_id, []).append(run)
    overlaps: list[tuple[Run, Run]] = []
    for entry_runs in by_entry.values():
        ordered = sorted(entry_runs, key=lambda run: run.started_at)
        overlaps.extend(
            (first, second)
            for first, second in itertools.pairwise(ordered)
            if second.started_at < end(first)
        )
    return overlaps


def database_now(conn: psycopg.Connection[Any]) -> datetime.datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    value: datetime.datetime = row[0]
    return value
