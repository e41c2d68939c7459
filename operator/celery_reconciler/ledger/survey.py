"""What a sweep of one policy has to do, asked in one statement that also publishes
the policy's rules.

Most sweeps of most policies find nothing to do: no attempt running, nothing lost, nothing
to settle, fold or prune. Asking each step's own statement to find that out cost a sweep
about fifteen round trips; ``survey`` asks all of it in one, each part through the index
its step would use, and the sweep runs only the steps it names (``planning.sweep_chores``).
The same statement publishes the policy's retry and lease rules to workers (a no-op write
when they are unchanged), as every sweep did.
What it reads may change right after (a worker finishes, a retry falls due): a step it
skipped then runs at the next sweep, which the loop schedules by ``seconds_until_next_due``
as before — the survey is a snapshot, as each step's own statement was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler import policy as policy_module
from celery_reconciler.ledger import shared

_UPSERT_POLICY = sql.SQL(
    """
    INSERT INTO {policies} AS p (policy_key, max_attempts, initial_delay_seconds,
        backoff_factor, max_delay_seconds, jitter, lease_seconds, task_name, queue)
    VALUES (%(policy_key)s, %(max_attempts)s, %(initial)s, %(factor)s, %(max_delay)s,
        %(jitter)s, %(lease)s, %(task_name)s, %(queue)s)
    ON CONFLICT (policy_key) DO UPDATE SET
        max_attempts = EXCLUDED.max_attempts,
        initial_delay_seconds = EXCLUDED.initial_delay_seconds,
        backoff_factor = EXCLUDED.backoff_factor,
        max_delay_seconds = EXCLUDED.max_delay_seconds,
        jitter = EXCLUDED.jitter,
        lease_seconds = EXCLUDED.lease_seconds,
        task_name = EXCLUDED.task_name,
        queue = EXCLUDED.queue,
        updated_at = now()
    WHERE (p.max_attempts, p.initial_delay_seconds, p.backoff_factor, p.max_delay_seconds,
           p.jitter, p.lease_seconds, p.task_name, p.queue)
        IS DISTINCT FROM
          (EXCLUDED.max_attempts, EXCLUDED.initial_delay_seconds, EXCLUDED.backoff_factor,
           EXCLUDED.max_delay_seconds, EXCLUDED.jitter, EXCLUDED.lease_seconds,
           EXCLUDED.task_name, EXCLUDED.queue)
    """
).format(policies=shared.POLICIES)


def _rules(policy: policy_module.Policy) -> dict[str, Any]:
    return {
        "policy_key": policy.key,
        "max_attempts": policy.retry.max_attempts,
        "initial": policy.retry.initial_delay_seconds,
        "factor": policy.retry.backoff_factor,
        "max_delay": policy.retry.max_delay_seconds,
        "jitter": policy.retry.jitter,
        "lease": policy.lease.timeout_seconds,
        "task_name": policy.task.name,
        "queue": policy.task.queue,
    }


_SURVEY = shared.rendered(
    sql.SQL(
        """
    WITH rules AS ({upsert})
    SELECT
        count(*) FILTER (WHERE e.state = 'running'),
        count(*) FILTER (WHERE e.state = 'queued' AND e.lease_deadline <= now()),
        count(*) FILTER (WHERE e.state IN ('retry_wait', 'dead')),
        count(*) FILTER (WHERE e.state = 'retry_wait' AND e.next_attempt_at <= now()),
        count(*) FILTER (WHERE e.state IN ('queued', 'running') AND e.lease_deadline > now()),
        count(*) FILTER (WHERE e.state = 'queued' AND e.lease_deadline > now()
            AND e.dispatched_at < now() - make_interval(secs => %(stranded_seconds)s)),
        EXTRACT(EPOCH FROM {next_due} - now()),
        EXISTS (SELECT 1 FROM {entries} u
                WHERE u.policy_key = %(policy_key)s AND u.state = 'succeeded' AND NOT u.counted),
        EXISTS (SELECT 1 FROM {attempts} a
                WHERE a.policy_key = %(policy_key)s AND a.finished_at IS NOT NULL
                  AND a.finished_at < now() - make_interval(secs => %(retention)s))
            OR EXISTS (SELECT 1 FROM {entries} s
                WHERE s.policy_key = %(policy_key)s AND s.state = 'succeeded' AND s.counted
                  AND s.finished_at < now() - make_interval(secs => %(retention)s)),
        EXISTS (SELECT 1 FROM {incarnations} i WHERE i.ended_at IS NULL AND i.pod_uid IS NULL
                  AND i.heartbeat_at < now() - make_interval(secs => i.heartbeat_timeout_seconds)),
        EXISTS (SELECT 1 FROM {incarnations} i WHERE i.ended_at < now() - interval '1 day')
    FROM {entries} e WHERE e.policy_key = %(policy_key)s AND e.state <> 'succeeded'
    """
    ).format(
        upsert=_UPSERT_POLICY,
        next_due=shared.NEXT_DUE,
        entries=shared.ENTRIES,
        attempts=shared.ATTEMPTS,
        incarnations=shared.INCARNATIONS,
    )
)


@dataclasses.dataclass(frozen=True)
class Survey:
    """What the ledger holds that a sweep of one policy may have to act on."""

    running: int  # attempts running (lost ones among them, if any)
    unstarted: int  # queued, lease run out: the message was lost (claimed again as it is)
    unsettled: int  # retry_wait or dead: the table may show them processed
    due_retries: int
    in_flight: int  # queued or running under a live lease
    queued_a_while: int  # queued longer than ``stranded_seconds``: is the message still there?
    seconds_until_next_due: float | None
    unfolded: bool  # successes not in the tally yet
    history_expired: bool  # attempts or succeeded entries past retention
    silent_incarnations: (
        bool  # of any policy, outside Kubernetes: a heartbeat older than its timeout
    )
    incarnations_expired: bool  # of any policy: ended more than a day ago


def survey(
    conn: psycopg.Connection[Any], policy: policy_module.Policy, *, stranded_seconds: float
) -> Survey:
    """Publish the policy's rules (``_UPSERT_POLICY``) and read what its sweep has to do."""
    row = conn.execute(
        _SURVEY,
        {
            **_rules(policy),
            "stranded_seconds": stranded_seconds,
            "retention": policy.history.retention_seconds,
        },
    ).fetchone()
    assert row is not None
    return Survey(
        running=row[0],
        unstarted=row[1],
        unsettled=row[2],
        due_retries=row[3],
        in_flight=row[4],
        queued_a_while=row[5],
        seconds_until_next_due=None if row[6] is None else float(row[6]),
        unfolded=row[7],
        history_expired=row[8],
        silent_incarnations=row[9],
        incarnations_expired=row[10],
    )
