"""The chaos verdict can fail: each invariant it checks, broken on purpose in real rows.

A checker that never fires proves nothing, so these write the rows a broken run would leave
— an entry without its effect, an effect twice, two runs of an entry at once, a run started
while another held the entry's lock, a killed run rescued — into a real PostgreSQL database
and read them back with the driver's own SQL.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from devstack import chaos, chaos_app

pytestmark = pytest.mark.chaos

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


@pytest.fixture
def conn(database_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as connection:
        for statement in chaos_app.SCHEMA:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO chaos_entry (body_seconds) SELECT 0 FROM generate_series(1, 3)"
        )
        yield connection


def run(
    conn: psycopg.Connection[Any],
    *,
    entry: int,
    pod: str,
    pid: int = 1,
    start: float,
    end: float | None,
    exclusive: bool = True,
    effect: bool = True,
) -> None:
    row = conn.execute(
        "INSERT INTO chaos_runs (entry_id, task_id, pod, pid, exclusive, started_at, finished_at) "
        "VALUES (%s, 't', %s, %s, %s, %s, %s) RETURNING id",
        [entry, pod, pid, exclusive, at(start), None if end is None else at(end)],
    ).fetchone()
    assert row is not None
    if effect:
        conn.execute(
            "INSERT INTO chaos_effects (entry_id, run_id) VALUES (%s, %s)", [entry, row[0]]
        )
        conn.execute("UPDATE chaos_entry SET processed = true WHERE id = %s", [entry])


def verdict(conn: psycopg.Connection[Any]) -> chaos.Figures:
    return chaos._verdict(
        conn, seed=1, faults={}, faults_while_pending=0, mid_sweep_kills=0, seconds=0
    )


def kill(conn: psycopg.Connection[Any], *, pod: str, when: float) -> None:
    conn.execute("INSERT INTO chaos_kills (pod, killed_at) VALUES (%s, %s)", [pod, at(when)])


def fence(conn: psycopg.Connection[Any], *, pod: str, pid: int, when: float) -> None:
    conn.execute(
        "INSERT INTO chaos_fences (pod, pid, fenced_at) VALUES (%s, %s, %s)", [pod, pid, at(when)]
    )


def test_a_clean_history_with_a_rescued_kill_passes_and_measures_the_rescue(
    conn: psycopg.Connection[Any],
) -> None:
    run(conn, entry=1, pod="a", start=0, end=None, effect=False)  # killed mid-body
    kill(conn, pod="a", when=1)
    run(conn, entry=1, pod="b", start=2.5, end=3)
    run(conn, entry=2, pod="b", pid=7, start=0, end=None, effect=False)  # fenced itself
    fence(conn, pod="b", pid=7, when=0.5)
    run(conn, entry=2, pod="b", pid=8, start=1, end=2)
    kill(conn, pod="b", when=5)  # later: it neither ended the fenced run nor is its rescue
    run(conn, entry=3, pod="a", start=1.5, end=2)  # after the kill: a's new container
    figures = verdict(conn)
    assert figures.violations == []
    assert figures.latencies == [1.5]
    assert (figures.killed_runs, figures.untraced_runs, figures.self_fenced) == (1, 0, 1)


def test_a_run_alive_after_its_process_fenced_elsewhere_is_still_an_overlap(
    conn: psycopg.Connection[Any],
) -> None:
    """A fence of another process of the same Pod ends nothing of this one."""
    run(conn, entry=1, pod="a", pid=7, start=0, end=None, effect=False)
    fence(conn, pod="a", pid=9, when=0.5)
    kill(conn, pod="a", when=5)
    run(conn, entry=1, pod="b", start=2, end=3)
    (violation,) = [v for v in verdict(conn).violations if "lost" not in v]  # 2 and 3 unrun
    assert violation.startswith("1 overlapping pairs of runs"), violation


def test_each_broken_invariant_is_named(conn: psycopg.Connection[Any]) -> None:
    run(conn, entry=1, pod="a", start=0, end=1)
    run(conn, entry=1, pod="b", start=2, end=3)  # a second effect: a duplicate
    run(conn, entry=2, pod="a", start=0, end=5, effect=False)
    run(conn, entry=2, pod="b", start=4, end=6, exclusive=False)  # overlaps the first
    # entry 3: never processed (lost); an unfinished run with no kill never ends
    run(conn, entry=3, pod="c", start=0, end=None, effect=False)
    run(conn, entry=3, pod="d", start=100, end=None, effect=False)
    text = " | ".join(verdict(conn).violations)
    assert "1 lost entries" in text, text
    assert "1 entries with duplicate effects" in text, text
    assert "2 overlapping pairs of runs" in text, text
    assert "1 runs started while another session held the entry's lock" in text, text


def plain(conn: psycopg.Connection[Any], *, entry: int, run_id: int, when: float) -> None:
    conn.execute(
        "INSERT INTO chaos_plain_effects (entry_id, run_id, committed_at) VALUES (%s, %s, %s)",
        [entry, run_id, at(when)],
    )


def run_id(conn: psycopg.Connection[Any], *, pod: str) -> int:
    row = conn.execute("SELECT max(id) FROM chaos_runs WHERE pod = %s", [pod]).fetchone()
    assert row is not None
    return int(row[0])


def test_a_plain_write_after_the_entry_moved_on_is_named_and_a_crash_repeat_is_not(
    conn: psycopg.Connection[Any],
) -> None:
    """Entry 1: the old body thawed and wrote its plain effect after the re-run started.
    Entry 2: the first run wrote its plain effect, then its Pod was killed; the re-run
    repeats it (at-least-once), which is counted but not a violation."""
    run(conn, entry=1, pod="a", start=0, end=None, effect=False)
    plain(conn, entry=1, run_id=run_id(conn, pod="a"), when=30)
    death(conn, pod="a", pid=1, when=31)
    run(conn, entry=1, pod="b", start=20, end=21)
    plain(conn, entry=1, run_id=run_id(conn, pod="b"), when=20.5)
    run(conn, entry=2, pod="c", start=0, end=None, effect=False)
    plain(conn, entry=2, run_id=run_id(conn, pod="c"), when=1)
    kill(conn, pod="c", when=2)
    run(conn, entry=2, pod="d", start=3, end=4)
    plain(conn, entry=2, run_id=run_id(conn, pod="d"), when=3.5)
    run(conn, entry=3, pod="d", start=5, end=6)
    figures = verdict(conn)
    text = " | ".join(figures.violations)
    assert "1 plain effects committed after a newer run of their entry had started" in text
    assert "1 overlapping pairs of runs" in text, text  # entry 1, bounded by its death
    assert len(figures.violations) == 2, text
    assert (figures.plain_repeated, figures.overlaps) == (2, 1)


def death(conn: psycopg.Connection[Any], *, pod: str, pid: int, when: float) -> None:
    conn.execute(
        "INSERT INTO chaos_deaths (pod, pid, died_at) VALUES (%s, %s, %s)", [pod, pid, at(when)]
    )


def test_a_frozen_run_ends_when_the_driver_saw_its_process_gone(
    conn: psycopg.Connection[Any],
) -> None:
    """No end row, no kill, no self-fence: the driver's watch of the frozen Pod's processes
    bounds it, and a rescue after that bound is no overlap."""
    run(conn, entry=1, pod="a", pid=8, start=0, end=None, effect=False)
    death(conn, pod="a", pid=8, when=14)
    conn.execute(
        "INSERT INTO chaos_freezes (pod, frozen_at, thawed_at) VALUES ('a', %s, %s)",
        [at(1), at(13)],
    )
    run(conn, entry=1, pod="b", start=15, end=16)
    run(conn, entry=2, pod="b", start=0, end=1)
    run(conn, entry=3, pod="b", start=2, end=3)
    figures = verdict(conn)
    assert figures.violations == []
    assert (figures.frozen_runs, figures.freeze_latencies, figures.untraced_runs) == (1, [14.0], 0)
