"""What a failed statement of ours means for the user, and how long one may take.

``database_failure`` turns a psycopg error into ``LedgerPermissionDenied`` (a GRANT is
missing: no retry helps), ``DatabaseUnavailable`` (it heals by itself: the sweep is retried
with backoff) or the error itself (a statement the server rejects is a bug of ours), with no
DSN or password in any message.
"""

from __future__ import annotations

import psycopg

from celery_reconciler.ledger import shared


class LedgerPermissionDenied(RuntimeError):
    """The database user may not create or use our schema; the fix is a GRANT, not a retry."""


def permission_denied(error: BaseException, *, dsn: str, doing: str) -> LedgerPermissionDenied:
    reason = shared.sanitize_database_error(str(error).strip() or type(error).__name__, dsn=dsn)
    return LedgerPermissionDenied(
        f"the database user may not use the operator's schema {shared.SCHEMA} while {doing} "
        f"({shared.describe_dsn(dsn)}): {reason} — the ledger lives in that schema of the entries' "
        f"database, created and owned by the operator's role: GRANT CONNECT, CREATE ON "
        f"DATABASE to the user of spec.source.databaseSecretRef (--dsn or "
        "CELERY_RECONCILER_DSN for the CLI); `celery-reconciler grants` prints every role's "
        "statements"
    )


# SQLSTATE classes of a failed server or connection (connection exceptions, insufficient
# resources, operator intervention such as a shutdown, a statement or lock timeout, system
# and internal errors): they heal by themselves, and the next sweep retries.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "55", "57", "58", "XX")


def database_failure(error: psycopg.Error, *, dsn: str, doing: str) -> Exception:
    """What an error of our own statements means for the user, without secrets.

    ``LedgerPermissionDenied`` when the user lacks rights on our schema;
    ``DatabaseUnavailable`` when the connection or the server failed (or a timeout hit);
    otherwise ``error`` itself — a statement of ours the server rejects is a bug, which
    the operator reports as ``InternalError``. Pure: it reads only the error.
    """
    state = error.sqlstate or ""
    if state == "42501":
        return permission_denied(error, dsn=dsn, doing=doing)
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError) or (
        state[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
    ):
        return shared.unavailable(error, dsn=dsn, doing=doing)
    return error


# The operator's own sessions are bounded: a statement (its reads of the user's table among
# them) may run this long, and a wait for a lock (a worker's fenced commit holding an entry
# row, a migration elsewhere) this long, before it fails and the sweep is retried with
# backoff — rather than holding a policy's loop in a thread nobody can cancel. Workers'
# sessions have neither: their task bodies may legitimately run long.
OPERATOR_STATEMENT_TIMEOUT_SECONDS = 60.0
OPERATOR_LOCK_TIMEOUT_SECONDS = 30.0
