"""What every part of the operator's ledger shares: the worker's half, the tables, the
expression of when a policy falls due next, and statements rendered once.

The worker's statements (``register_incarnation``, ``heartbeat``, ``start_attempt``,
``record_success``, ``retry_rules``, ``record_failure``) and what both sides must share (the
schema and its migrations, ``ensure_schema``, ``connect``, the scrubbing of secrets from
errors) live in ``celery_reconciler_worker.ledger``, because a worker image installs that
package without this one; they are named here, and handed on by ``ledger``, so the operator,
the CLI and tests read one module.
"""

from __future__ import annotations

from psycopg import sql

from celery_reconciler_worker import ledger as worker_ledger

# The worker's half and what both halves share, under the names callers have always used.
SCHEMA = worker_ledger.SCHEMA
SCHEMA_VERSION = worker_ledger.SCHEMA_VERSION
DatabaseUnavailable = worker_ledger.DatabaseUnavailable
DsnInvalid = worker_ledger.DsnInvalid
TooManyConnections = worker_ledger.TooManyConnections
RunningAttempt = worker_ledger.RunningAttempt
WorkerIdentity = worker_ledger.WorkerIdentity
sanitize_error = worker_ledger.sanitize_error
dsn_secrets = worker_ledger.dsn_secrets
check_dsn = worker_ledger.check_dsn
describe_dsn = worker_ledger.describe_dsn
sanitize_database_error = worker_ledger.sanitize_database_error
unavailable = worker_ledger.unavailable
connect = worker_ledger.connect
ensure_schema = worker_ledger.ensure_schema
start_attempt = worker_ledger.start_attempt
record_success = worker_ledger.record_success
record_failure = worker_ledger.record_failure
register_incarnation = worker_ledger.register_incarnation
heartbeat = worker_ledger.heartbeat

POLICIES = worker_ledger.POLICIES
ENTRIES = worker_ledger.ENTRIES
ATTEMPTS = worker_ledger.ATTEMPTS
INCARNATIONS = worker_ledger.INCARNATIONS
TALLIES = worker_ledger.TALLIES
OWNERS = worker_ledger.OWNERS
SWEEPS = worker_ledger.SWEEPS


# When the loop must look again: the earliest due retry, lease deadline, or the moment a
# running attempt's incarnation would be silent for longer than its heartbeat timeout.
NEXT_DUE = sql.SQL(
    """
    min(CASE
        WHEN e.state = 'retry_wait' THEN e.next_attempt_at
        WHEN e.state = 'queued' THEN e.lease_deadline
        WHEN e.state = 'running' THEN least(e.lease_deadline,
            (SELECT i.heartbeat_at + make_interval(secs => i.heartbeat_timeout_seconds)
             FROM {incarnations} i WHERE i.id = e.incarnation))
    END)
    """
).format(incarnations=INCARNATIONS)


def rendered(statement: sql.Composed) -> bytes:
    """A statement's text, composed once. psycopg renders a ``Composed`` afresh at every
    execution, walking its tree of text and identifiers; for the statements every sweep of
    every policy runs, that cost more CPU than the rest of the statement's handling. Our
    statements hold only our schema's ASCII names and placeholders, so their text is the
    same on every connection."""
    return statement.as_bytes(None)
