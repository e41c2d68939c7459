"""Helpers for the tests of worker incarnations, heartbeats and fenced commits.

``Sweeper`` is the operator's timer in a thread (the real ``reconcile_once``, every few
tenths of a second) so a test can freeze, cut off or kill a worker while sweeps go on.
``BodyWatch`` notes, from outside, when the process that ran a body died — a body killed by
its own worker (self-fencing) leaves no ``finished_at``, and "runs never overlap" needs that
moment. Every time here is the database's clock, like the ledger's.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
from reconcile_support import Worker, sweep_connections

from celery_app.demo import audit
from celery_reconciler import policy, reconcile

# Heartbeats are judged against this timeout (seconds); far below every lease used here, so
# that only heartbeats — never the lease backstop — can explain a quick recovery.
HEARTBEAT_TIMEOUT_SECONDS = 6
HEARTBEAT_ENV = {"CELERY_RECONCILER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_SECONDS)}


class Sweeper:
    """``with Sweeper(policy, dsn=..., broker_url=...):`` sweeps in a thread until the end of
    the block; a sweep that raised fails the test there (with what it raised)."""

    def __init__(
        self,
        policy_: policy.Policy,
        *,
        dsn: str,
        broker_url: str,
        interval_seconds: float = 0.3,
    ) -> None:
        self._policy = policy_
        self._dsn = dsn
        self._broker_url = broker_url
        self._interval_seconds = interval_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self.errors: list[BaseException] = []
        self.sweeps = 0

    def __enter__(self) -> Sweeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(30)
        if self.errors and exc[0] is None:
            raise AssertionError(f"a sweep failed: {self.errors[0]!r}") from self.errors[0]

    def _run(self) -> None:
        with sweep_connections(self._dsn, self._broker_url) as (db, publisher):
            while not self._stopping.is_set():
                try:
                    reconcile.reconcile_once(self._policy, db=db, broker=publisher)
                    self.sweeps += 1
                except Exception as error:  # reported by __exit__
                    self.errors.append(error)
                    return
                self._stopping.wait(self._interval_seconds)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


class BodyWatch:
    """Polls the processes that ran bodies (``task_runs.pid``) and notes when each died."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="body-watch", daemon=True)
        self.died_at: dict[int, datetime.datetime] = {}

    def __enter__(self) -> BodyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stopping.is_set():
                pids = [row[0] for row in conn.execute("SELECT DISTINCT pid FROM task_runs")]
                for pid in pids:
                    if pid not in self.died_at and not alive(pid):
                        self.died_at[pid] = audit.database_now(conn)
                self._stopping.wait(0.05)


@dataclasses.dataclass(frozen=True)
class TimedRun:
    run: audit.Run
    pid: int
    ended: datetime.datetime  # finished_at, else when its process died, else "never"


def timed_runs(
    conn: psycopg.Connection[Any], *, died_at: dict[int, datetime.datetime]
) -> list[TimedRun]:
    rows = conn.execute(
        "SELECT entry_id, task_id, worker, started_at, finished_at, outcome, pid FROM task_runs "
        "ORDER BY entry_id, started_at"
    ).fetchall()
    found = []
    for *fields, pid in rows:
        run = audit.Run(*fields)
        ended = run.finished_at or died_at.get(pid, audit.NEVER)
        found.append(TimedRun(run=run, pid=pid, ended=ended))
    return found


def overlapping(runs: Iterable[TimedRun]) -> list[tuple[TimedRun, TimedRun]]:
    """Pairs of runs of one entry whose intervals overlap (a killed run ends at its death)."""
    by_entry: dict[int, list[TimedRun]] = {}
    for timed in runs:
        by_entry.setdefault(timed.run.entry_id, []).append(timed)
    pairs = []
    for entry_runs in by_entry.values():
        ordered = sorted(entry_runs, key=lambda timed: timed.run.started_at)
        for index, first in enumerate(ordered):
            pairs.extend(
                (first, second)
                for second in ordered[index + 1 :]
                if second.run.started_at < first.ended
            )
    return pairs


def successes_by_entry(conn: psycopg.Connection[Any]) -> dict[int, int]:
    """How many times each entry's effect was committed (a ``succeeded`` run is written in
    the same transaction as the entry's insights)."""
    return {
        int(entry_id): int(count)
        for entry_id, count in conn.execute(
            "SELECT j.id, count(r.id) FROM journal_entry j LEFT JOIN task_runs r "
            "ON r.entry_id = j.id AND r.outcome = 'succeeded' GROUP BY j.id"
        )
    }


def ledger_states(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Entry id -> ledger state; empty before the first sweep created the ledger."""
    exists = conn.execute("SELECT to_regclass('celery_reconciler.entries')").fetchone()
    if exists is None or exists[0] is None:
        return {}
    return {
        str(entry_id): str(state)
        for entry_id, state in conn.execute(
            "SELECT entry_id, state FROM celery_reconciler.entries ORDER BY entry_id"
        )
    }


def lost_attempts(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT entry_id, attempt, worker, error FROM celery_reconciler.attempts "
        "WHERE outcome = 'lost' ORDER BY entry_id, attempt"
    ).fetchall()


def seconds_since(conn: psycopg.Connection[Any], moment: datetime.datetime) -> float:
    return (audit.database_now(conn) - moment).total_seconds()


def signal_worker(worker: Worker, signum: signal.Signals) -> None:
    """Send ``signum`` to the worker's whole process group (main process and pool)."""
    popen = worker.process.popen
    assert popen is not None
    os.killpg(popen.pid, signum)
