"""The chaos suite's own Celery app: a task body that keeps its own record, in its own tables.

``devstack.chaos`` proves "0 lost, 0 duplicate effects, 0 overlapping runs" from rows that
neither the operator nor the worker integration ever writes, so a bug in our ledger cannot
hide a bug in our ledger. The body is what a careful user's task looks like:

* ``chaos_runs``: one row per body run, committed *before* the work, with the run's start
  (the database's clock), its pod, and whether it got the entry's advisory lock — a second,
  independent witness of "no concurrent double run" (the lock dies with the session of a
  killed process, so a rescued run gets it; a run that finds it held is overlapping one that
  is still alive). The end (``finished_at``) is written in the same transaction as the
  effect on success, or as soon as the database answers on any other way out.
* ``chaos_effects``: the effect — one row appended per successful run, with no unique
  constraint that could hide a duplicate — committed in ``reliable.fenced_transaction``
  together with the ledger's done mark: the exactly-once claim under test.
* ``chaos_plain_effects``: a write outside the fence, committed on its own just before the
  fenced one, as a body without the helper writes. A crash between the two repeats it when
  the entry runs again (at-least-once, as documented); one committed after another run of
  its entry had started is a stale body's write — what proof of death must rule out.
* ``chaos_gil_holds``: entries the driver armed with a one-shot GIL hold: the first run of
  such an entry records that it fired and spends its seconds in one C call that keeps the
  GIL (``celery_app.faults``), so neither its heartbeat nor its watchdog can run.

Workers run it as real Pods of the project's image (``celery_app`` from the image), with
this module mounted from the checkout, the way a user's image carries their code beside our
integration (``devstack.workers.start_worker_pod(app_source=...)``).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import celery
import psycopg

from celery_app import faults
from celery_reconciler_worker import reliable

TASK_NAME = "chaos.process_entry"
QUEUE = "chaos"
# The first key of the two-key advisory lock: "an entry of the chaos table".
LOCK_CLASS = 4242
# How long a body that failed keeps trying to record its end while the database is away.
RECORD_END_SECONDS = 120.0

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS chaos_entry (
        id bigserial PRIMARY KEY,
        created_at timestamptz NOT NULL DEFAULT now(),
        body_seconds double precision NOT NULL,
        processed boolean NOT NULL DEFAULT false
    )
    """,
    "CREATE INDEX IF NOT EXISTS chaos_entry_pending ON chaos_entry (created_at, id) "
    "WHERE NOT processed",
    """
    CREATE TABLE IF NOT EXISTS chaos_runs (
        id bigserial PRIMARY KEY,
        entry_id bigint NOT NULL,
        task_id text NOT NULL,
        pod text NOT NULL,
        pid integer NOT NULL,
        exclusive boolean NOT NULL,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at timestamptz,
        outcome text
    )
    """,
    "CREATE INDEX IF NOT EXISTS chaos_runs_by_entry ON chaos_runs (entry_id, started_at)",
    """
    CREATE TABLE IF NOT EXISTS chaos_effects (
        id bigserial PRIMARY KEY,
        entry_id bigint NOT NULL,
        run_id bigint NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    "CREATE INDEX IF NOT EXISTS chaos_effects_by_entry ON chaos_effects (entry_id)",
    """
    CREATE TABLE IF NOT EXISTS chaos_plain_effects (
        id bigserial PRIMARY KEY,
        entry_id bigint NOT NULL,
        run_id bigint NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    "CREATE INDEX IF NOT EXISTS chaos_plain_effects_by_entry ON chaos_plain_effects (entry_id)",
    """
    CREATE TABLE IF NOT EXISTS chaos_gil_holds (
        entry_id bigint PRIMARY KEY,
        seconds double precision NOT NULL,
        armed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        run_id bigint,
        fired_at timestamptz
    )
    """,
    # Written by the driver at the end: when it killed which worker Pod's container, when
    # a worker process killed itself (its self-fence, read from the Pod's log), when it saw
    # a process of a Pod it had frozen gone, and when it froze and thawed which Pod.
    """
    CREATE TABLE IF NOT EXISTS chaos_kills (
        pod text NOT NULL,
        killed_at timestamptz NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS chaos_fences (
        pod text NOT NULL,
        pid integer NOT NULL,
        fenced_at timestamptz NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS chaos_deaths (
        pod text NOT NULL,
        pid integer NOT NULL,
        died_at timestamptz NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS chaos_freezes (
        pod text NOT NULL,
        frozen_at timestamptz NOT NULL,
        thawed_at timestamptz NOT NULL
    )
    """,
)

app = celery.Celery("chaos", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(reliable.recommended_settings(lease_seconds=120))
app.conf.task_default_queue = QUEUE
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False


class _Connection:
    """One autocommit connection per pool process, opened after the fork and replaced when
    a database restart killed it."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._connection: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():
            self._connection = None  # the parent's, inherited across fork: never touched
        if self._connection is not None and not self._connection.closed:
            try:
                self._connection.execute("SELECT 1")
            except psycopg.Error:
                self._connection = None
        if self._connection is None or self._connection.closed:
            self._connection = psycopg.connect(
                os.environ[reliable.DSN_ENVIRONMENT_VARIABLE], autocommit=True, connect_timeout=5
            )
            self._pid = os.getpid()
        return self._connection


_connection = _Connection()


@app.task(bind=True, base=reliable.ReconciledTask, name=TASK_NAME)  # type: ignore[untyped-decorator]
def process_entry(self: reliable.ReconciledTask, entry_id: str) -> None:
    entry = int(entry_id)
    conn = _connection.get()
    # A lock this session kept from an earlier body (a way out that could not unlock)
    # must not make the next run of that entry look like an overlap.
    conn.execute("SELECT pg_advisory_unlock_all()")
    row = conn.execute(
        """
        WITH locked AS (SELECT pg_try_advisory_lock(%(class)s, %(entry)s::int) AS exclusive)
        INSERT INTO chaos_runs (entry_id, task_id, pod, pid, exclusive)
        SELECT %(entry)s, %(task)s, %(pod)s, %(pid)s, exclusive FROM locked
        RETURNING id, (SELECT body_seconds FROM chaos_entry WHERE id = %(entry)s)
        """,
        {
            "class": LOCK_CLASS,
            "entry": entry,
            "task": str(self.request.id),
            "pod": reliable.worker_name(),
            "pid": os.getpid(),
        },
    ).fetchone()
    assert row is not None
    run_id, body_seconds = row
    try:
        hold = conn.execute(
            "UPDATE chaos_gil_holds SET run_id = %s, fired_at = clock_timestamp() "
            "WHERE entry_id = %s AND fired_at IS NULL RETURNING seconds",
            [run_id, entry],
        ).fetchone()
        if hold is not None:
            faults.hold_the_gil(seconds=float(hold[0]))
        time.sleep(float(body_seconds))
        conn.execute(
            "INSERT INTO chaos_plain_effects (entry_id, run_id) VALUES (%s, %s)", [entry, run_id]
        )
        with reliable.fenced_transaction(conn):
            conn.execute(
                "INSERT INTO chaos_effects (entry_id, run_id) VALUES (%s, %s)", [entry, run_id]
            )
            conn.execute("UPDATE chaos_entry SET processed = true WHERE id = %s", [entry])
            conn.execute(
                "UPDATE chaos_runs SET finished_at = clock_timestamp(), outcome = 'succeeded' "
                "WHERE id = %s",
                [run_id],
            )
    except BaseException as error:
        _record_end(run_id, outcome=type(error).__name__)
        raise
    finally:
        with contextlib.suppress(psycopg.Error):  # a dead session holds no lock
            conn.execute("SELECT pg_advisory_unlock_all()")


def _record_end(run_id: int, *, outcome: str) -> None:
    """Write the end of a run that did not succeed, waiting for the database if it is away:
    until the end is written, this process is still "running" the body as far as the
    audit knows, which keeps the overlap check conservative."""
    deadline = time.monotonic() + RECORD_END_SECONDS
    while True:
        try:
            _connection.get().execute(
                "UPDATE chaos_runs SET finished_at = clock_timestamp(), outcome = %s "
                "WHERE id = %s AND finished_at IS NULL",
                [outcome, run_id],
            )
            return
        except psycopg.Error:
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)
