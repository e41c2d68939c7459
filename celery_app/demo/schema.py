"""The demo's tables: ``journal_entry`` (the user's table), ``task_runs`` and ``demo_faults``.

``journal_entry`` is shaped like a real app's table and untouched by celery-reconciler: an
entry is pending while ``insights_extracted`` is false, and the partial index on pending
rows is what keeps a sweep's cost proportional to the backlog.

``task_runs`` records every run of the task body (worker, process, start, finish) in the
database, so tests count runs and detect overlapping runs from durable rows, even for a
worker that was killed mid-run (its run has no ``finished_at``).

``demo_faults`` makes chosen entries misbehave: ``fail`` raises on every run while the row
exists; ``sleep`` holds the body for ``seconds`` (to kill a worker mid-task or overrun a
lease). ``gil`` fires once: the body spends ``seconds`` in one C call that holds the GIL, so
no other thread of its process runs meanwhile (its heartbeat and watchdog included). The
others fire once — the row is deleted when they fire, so a re-run is ordinary —
and place a stop at an exact point of the body, for tests that kill or freeze the worker
there: ``hold_before_commit``, ``hold_after_commit`` and ``hold_after_done`` (after the
task returned and its outcome was recorded) sleep ``seconds`` at that point;
``unfenced_commit_then_kill`` commits the effect in a plain transaction of its own (as a
body that does not use the fenced-commit helper would) and then SIGKILLs the whole worker
(its process group) before anything records the outcome. With ``unfenced`` set, the body
commits its effect in a plain transaction of its own instead of ``fenced_transaction``
(as a body that does not use the fenced-commit helper would; the outcome is then marked by
the heartbeat), so tests can count duplicate effects that no fence rolled back.
"""

from __future__ import annotations

from typing import Any

import psycopg

from celery_app.demo import settings

TASK_NAME = settings.TASK_NAME

_STATEMENTS = (
    """
    CREATE TABLE IF NOT EXISTS journal_entry (
        id bigserial PRIMARY KEY,
        "user" text NOT NULL,
        body text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        insights jsonb,
        insights_extracted boolean NOT NULL DEFAULT false
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS journal_entry_pending
        ON journal_entry (created_at, id) WHERE NOT insights_extracted
    """,
    """
    CREATE TABLE IF NOT EXISTS task_runs (
        id bigserial PRIMARY KEY,
        entry_id bigint NOT NULL,
        task_id text NOT NULL,
        worker text NOT NULL,
        pid integer NOT NULL,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at timestamptz,
        outcome text
    )
    """,
    "CREATE INDEX IF NOT EXISTS task_runs_by_entry ON task_runs (entry_id)",
    """
    CREATE TABLE IF NOT EXISTS demo_faults (
        entry_id bigint PRIMARY KEY,
        kind text NOT NULL CHECK (kind IN ('fail', 'sleep', 'gil', 'hold_before_commit',
            'hold_after_commit', 'hold_after_done', 'unfenced_commit_then_kill')),
        seconds double precision NOT NULL DEFAULT 0,
        unfenced boolean NOT NULL DEFAULT false
    )
    """,
)

_SAMPLE_BODIES = (
    "Slept well and went for a long run. Grateful for the sunshine, feeling great today!",
    "Work was stressful; the deadline moved again. Why does this keep happening?",
    "Called mum, cooked pasta, read two chapters. A calm and happy evening.",
    "Tired and anxious about the exam tomorrow. I should review the notes again.",
    "Team lunch was fun. Learned a new trick in Python and shipped the feature.",
)


def create_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the demo tables if missing (idempotent)."""
    with conn.transaction():
        for statement in _STATEMENTS:
            conn.execute(statement)


def seed(
    conn: psycopg.Connection[Any],
    *,
    count: int,
    processed: int = 0,
    user: str = "demo",
) -> None:
    """Insert ``count`` pending entries (and ``processed`` already processed ones before them).

    Generated server-side with ``generate_series`` so 100k rows take a moment, not minutes.
    """
    bodies = list(_SAMPLE_BODIES)
    with conn.transaction():
        if processed:
            conn.execute(
                """
                INSERT INTO journal_entry ("user", body, created_at, insights, insights_extracted)
                SELECT %(user)s, (%(bodies)s::text[])[1 + n %% %(kinds)s],
                       now() - interval '1 day' + n * interval '1 millisecond', '{}'::jsonb, true
                FROM generate_series(1, %(count)s) AS n
                """,
                {"user": user, "bodies": bodies, "kinds": len(bodies), "count": processed},
            )
        conn.execute(
            """
            INSERT INTO journal_entry ("user", body, created_at)
            SELECT %(user)s, (%(bodies)s::text[])[1 + n %% %(kinds)s],
                   now() + n * interval '1 microsecond'
            FROM generate_series(1, %(count)s) AS n
            """,
            {"user": user, "bodies": bodies, "kinds": len(bodies), "count": count},
        )


def set_fault(
    conn: psycopg.Connection[Any],
    *,
    entry_id: int,
    kind: str,
    seconds: float = 0.0,
    unfenced: bool = False,
) -> None:
    conn.execute(
        """
        INSERT INTO demo_faults (entry_id, kind, seconds, unfenced) VALUES (%s, %s, %s, %s)
        ON CONFLICT (entry_id) DO UPDATE
            SET kind = EXCLUDED.kind, seconds = EXCLUDED.seconds, unfenced = EXCLUDED.unfenced
        """,
        [entry_id, kind, seconds, unfenced],
    )


def clear_fault(conn: psycopg.Connection[Any], *, entry_id: int) -> None:
    conn.execute("DELETE FROM demo_faults WHERE entry_id = %s", [entry_id])


def secrets(*, dsn: str, broker_url: str) -> list[dict[str, Any]]:
    """The two Secrets ``policy_spec`` names (``demo-db``, ``demo-broker``), as manifests."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "demo-db"},
            "stringData": {"dsn": dsn},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "demo-broker"},
            "stringData": {"url": broker_url},
        },
    ]


def policy_spec(
    *,
    sweep_interval: str = "5m",
    lease_timeout: str = "15m",
    retry: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    task_name: str = TASK_NAME,
) -> dict[str, Any]:
    """The ProcessingPolicy spec of the demo (secret refs included, as in a cluster)."""
    return {
        "source": {
            "databaseSecretRef": {"name": "demo-db", "key": "dsn"},
            "table": "public.journal_entry",
            "idColumn": "id",
            "pending": {"column": "insights_extracted", "equals": False},
            "orderBy": "created_at",
        },
        "task": {
            "name": task_name,
            "brokerSecretRef": {"name": "demo-broker", "key": "url"},
            "queue": settings.QUEUE,
        },
        "schedule": {"sweepInterval": sweep_interval},
        "retry": retry
        or {"maxAttempts": 5, "initialDelay": "60s", "factor": 2, "maxDelay": "1h", "jitter": True},
        "lease": {"timeout": lease_timeout},
        "limits": limits or {"batchSize": 500, "maxInFlight": 10000},
    }
