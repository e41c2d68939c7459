"""``insights.tasks.extract_insights_task``: derive simple insights from a journal entry.

The body is deliberately ordinary — read the entry, compute insights, store them and set
``insights_extracted = true`` in one transaction — because the point of the demo is that
the reliability comes from ``reliable.ReconciledTask`` and the operator, not from the task.
It also records its run in ``task_runs`` (committed before the work, so a killed run stays
visible) and obeys ``demo_faults``, whose one-shot kinds stop the body at an exact point
(before its commit, after it, after the outcome was recorded) or commit unfenced and kill
the worker, for the tests that freeze or kill a worker there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from typing import Any

import celery.signals
import psycopg

from celery_app import faults
from celery_app.demo import settings
from celery_app.demo.app import app
from celery_reconciler_worker import reliable

POSITIVE_WORDS = frozenset(
    {"calm", "enjoy", "fun", "glad", "good", "grateful", "great", "happy", "love"}
    | {"learned", "proud", "shipped", "well"}
)
NEGATIVE_WORDS = frozenset(
    {"angry", "anxious", "bad", "sad", "stressful", "tired", "upset", "worried"}
)
STOP_WORDS = frozenset(
    {"a", "an", "and", "the", "to", "of", "in", "on", "for", "is", "was", "i", "my", "me"}
    | {"it", "this", "that", "be", "with", "at", "why", "does", "so", "again", "should"}
)


class DemoFailure(RuntimeError):
    """Raised for an entry marked ``fail`` in ``demo_faults``."""


def derive_insights(body: str) -> dict[str, Any]:
    """Word count, mood from a small lexicon, top words and questions asked."""
    words = re.findall(r"[a-z']+", body.lower())
    positive = sum(word in POSITIVE_WORDS for word in words)
    negative = sum(word in NEGATIVE_WORDS for word in words)
    mood = "positive" if positive > negative else "negative" if negative > positive else "neutral"
    top = Counter(word for word in words if word not in STOP_WORDS and len(word) > 2)
    return {
        "word_count": len(words),
        "mood": mood,
        "top_words": [word for word, _ in top.most_common(3)],
        "questions": body.count("?"),
    }


# One autocommit connection per worker process, opened after the pool forks, and per thread
# (the threads pool runs bodies side by side); checked before each body, so a database
# restart is found before the body starts.
_connection = reliable.ProcessLocalConnection(
    lambda: psycopg.connect(os.environ[reliable.DSN_ENVIRONMENT_VARIABLE], autocommit=True),
    per_thread=True,
    check_alive=True,
)


def _extract_insights(self: reliable.ReconciledTask, entry_id: str) -> dict[str, Any]:
    try:
        conn = _connection.get()
        return _extract(conn, entry_id=int(entry_id), task_id=str(self.request.id))
    except psycopg.OperationalError:
        _connection.failed()
        raise


extract_insights_task = app.task(bind=True, base=reliable.ReconciledTask, name=settings.TASK_NAME)(
    _extract_insights
)


def _extract(conn: psycopg.Connection[Any], *, entry_id: int, task_id: str) -> dict[str, Any]:
    run = conn.execute(
        "INSERT INTO task_runs (entry_id, task_id, worker, pid) VALUES (%s, %s, %s, %s) "
        "RETURNING id",
        [entry_id, task_id, reliable.worker_name(), os.getpid()],
    ).fetchone()
    assert run is not None
    run_id = run[0]
    fault = conn.execute(
        "SELECT kind, seconds, unfenced FROM demo_faults WHERE entry_id = %s", [entry_id]
    ).fetchone()
    if fault is not None and fault[0] == "sleep":
        time.sleep(float(fault[1]))
    if fault is not None and fault[0] == "gil":
        _hold_the_gil_once(conn, entry_id=entry_id)
    if fault is not None and fault[0] == "fail":
        conn.execute(
            "UPDATE task_runs SET finished_at = clock_timestamp(), outcome = 'failed' "
            "WHERE id = %s",
            [run_id],
        )
        raise DemoFailure(f"entry {entry_id} is marked to fail in demo_faults")
    row = conn.execute("SELECT body FROM journal_entry WHERE id = %s", [entry_id]).fetchone()
    if row is None:
        raise LookupError(f"journal entry {entry_id} does not exist")
    insights = derive_insights(row[0])
    kind = None if fault is None else str(fault[0])
    if kind == "unfenced_commit_then_kill":
        _commit_unfenced_then_kill(conn, entry_id=entry_id, run_id=run_id, insights=insights)
    if kind == "hold_before_commit":
        _hold_once(conn, entry_id=entry_id, kind=kind)
    if fault is not None and fault[2]:
        # A body without the fenced-commit helper: its effect commits whoever runs it.
        with conn.transaction():
            _write_effect(conn, entry_id=entry_id, run_id=run_id, insights=insights)
        return insights
    # The effect, the audit row and the done mark commit together or not at all.
    with reliable.fenced_transaction(conn):
        _write_effect(conn, entry_id=entry_id, run_id=run_id, insights=insights)
    if kind == "hold_after_commit":
        _hold_once(conn, entry_id=entry_id, kind=kind)
    if kind == "hold_after_done":
        _holds_after_done[task_id] = entry_id
    return insights


# Entries whose one-shot ``hold_after_done`` fault waits for the end of the task, by task id.
_holds_after_done: dict[str, int] = {}


def _hold_once(conn: psycopg.Connection[Any], *, entry_id: int, kind: str) -> None:
    """Consume the entry's one-shot fault ``kind`` and sleep its seconds (a point to stop at)."""
    row = conn.execute(
        "DELETE FROM demo_faults WHERE entry_id = %s AND kind = %s RETURNING seconds",
        [entry_id, kind],
    ).fetchone()
    if row is not None:
        time.sleep(float(row[0]))


def _hold_the_gil_once(conn: psycopg.Connection[Any], *, entry_id: int) -> None:
    """Consume the entry's one-shot ``gil`` fault and spend its seconds in one C call that
    keeps the GIL (``faults.hold_the_gil``). The fault stays as a zero-second ``sleep``, so a
    re-run commits the same way (``unfenced``)."""
    row = conn.execute(
        "WITH held AS (SELECT seconds FROM demo_faults WHERE entry_id = %(entry)s "
        "AND kind = 'gil' FOR UPDATE) "
        "UPDATE demo_faults f SET kind = 'sleep', seconds = 0 FROM held "
        "WHERE f.entry_id = %(entry)s RETURNING held.seconds",
        {"entry": entry_id},
    ).fetchone()
    if row is not None:
        faults.hold_the_gil(seconds=float(row[0]))


def _commit_unfenced_then_kill(
    conn: psycopg.Connection[Any], *, entry_id: int, run_id: int, insights: dict[str, Any]
) -> None:
    """Commit the effect the way a body without the fenced-commit helper does, then die
    (the whole worker, as a pod's container would) before anything records the outcome."""
    with conn.transaction():
        _write_effect(conn, entry_id=entry_id, run_id=run_id, insights=insights)
        conn.execute("DELETE FROM demo_faults WHERE entry_id = %s", [entry_id])
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _write_effect(
    conn: psycopg.Connection[Any], *, entry_id: int, run_id: int, insights: dict[str, Any]
) -> None:
    """The task's effect — the insights and the processed flag — and its audit row."""
    conn.execute(
        "UPDATE journal_entry SET insights = %s, insights_extracted = true WHERE id = %s",
        [json.dumps(insights), entry_id],
    )
    conn.execute(
        "UPDATE task_runs SET finished_at = clock_timestamp(), outcome = 'succeeded' WHERE id = %s",
        [run_id],
    )


def _hold_after_done(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """After ``ReconciledTask`` recorded the outcome: the ``hold_after_done`` stop."""
    entry_id = _holds_after_done.pop(str(task_id), None)
    if entry_id is not None:
        _hold_once(_connection.get(), entry_id=entry_id, kind="hold_after_done")


celery.signals.task_postrun.connect(_hold_after_done, weak=False)
