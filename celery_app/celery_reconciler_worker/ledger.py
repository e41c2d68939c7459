"""The worker's half of the ledger, and the schema both halves share.

The ledger lives in the user's database, in a schema we own (``celery_reconciler``), so that
"is this entry in flight?" and "did the worker finish it?" are answered by the same
transactional store that holds the entries: a worker needs no Kubernetes access, only the
DSN of that database.

This module is what a worker image installs (celery and psycopg, nothing of the
operator), so it holds every statement a worker runs, and everything both sides must agree
on exactly once: the schema and its migrations (a worker may be the first to connect),
the table identifiers, the attempt-history CTE, connections and the scrubbing of secrets
from errors. The operator's ``celery_reconciler.ledger`` builds its own statements on these
and re-exports them, so one copy of each statement exists.

Tables (see docs/design.md), created and migrated here (``ensure_schema``):

* ``policies``: the retry and lease rules of each policy, upserted by the operator every
  sweep so workers can compute backoff without reading the ProcessingPolicy.
* ``entries``: one row per (policy, entry id) with its state machine
  ``queued -> running -> succeeded | retry_wait | dead``, the fence token (the Celery task id
  of the current dispatch), the lease deadline, the incarnation running it and the last error.
* ``attempts``: the history of each execution, for ``explain`` and for tests that check the
  retry timestamps.
* ``policy_owners`` and ``sweeps``: the operator's, for active-active replicas (which
  replica owns each policy under which fencing token, and each sweep's interval); workers
  never touch them.
* ``incarnations``: one row per worker process life (pod uid, container id or start time,
  host, pid, heartbeat). Liveness is a fact about an incarnation, never about a name: the
  operator ends one when a pod event proves its container dead, or when its heartbeat is older
  than its timeout — by then the worker has stopped its own bodies (``reliable``).

The worker calls ``register_incarnation``, ``heartbeat`` (which also marks finished bodies
succeeded, in batches), ``start_attempt`` (the atomic fence check), ``record_success``
(inside the body's own transaction: the fenced commit), ``retry_rules``, ``record_failure``,
``incarnation_is_live`` and (its guardian) ``end_incarnations``. Each is one call of a
``SECURITY DEFINER`` function of the schema (``WORKER_FUNCTIONS``), so a worker's login
needs no right on any table: the least-privilege worker role of ``celery-reconciler grants``.

Every statement is composed with ``psycopg.sql`` from constant text and identifiers; values
are always bound parameters. All times are the database's ``now()``, never a host clock, so
leases mean the same on every machine. Functions expect an autocommit connection and open
their own transaction where they need one.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import conninfo, sql

from celery_reconciler_worker import backoff, migrations

SCHEMA = "celery_reconciler"
# pg_advisory_lock key for migrations: b"celeryrc" read as a big-endian integer.
MIGRATION_LOCK_ID = int.from_bytes(b"celeryrc", "big") & 0x7FFF_FFFF_FFFF_FFFF
ERROR_TEXT_LIMIT = 2000

STATES = ("queued", "running", "retry_wait", "succeeded", "dead")

# Our tables, qualified: the operator composes its statements with these too.
POLICIES = sql.Identifier(SCHEMA, "policies")
ENTRIES = sql.Identifier(SCHEMA, "entries")
ATTEMPTS = sql.Identifier(SCHEMA, "attempts")
INCARNATIONS = sql.Identifier(SCHEMA, "incarnations")
TALLIES = sql.Identifier(SCHEMA, "tallies")
BACKLOG = sql.Identifier(SCHEMA, "backlog")
OWNERS = sql.Identifier(SCHEMA, "policy_owners")
SWEEPS = sql.Identifier(SCHEMA, "sweeps")
POLICY_WORK = sql.Identifier(SCHEMA, "policy_work")
_SCHEMA = sql.Identifier(SCHEMA)
_MIGRATIONS_TABLE = sql.Identifier(SCHEMA, "schema_migrations")


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL cannot be reached or failed mid-operation; the message carries no secrets."""


class TooManyConnections(DatabaseUnavailable):
    """The server has no connection slot left (SQLSTATE 53300, "too many clients"): a
    capacity problem of the server, which a hint about the DSN would misdirect."""


# SQLSTATE too_many_connections. A refusal at connect time reaches libpq before any result
# exists, so psycopg may carry no SQLSTATE then: the server's wording is the fallback.
TOO_MANY_CONNECTIONS_SQLSTATE = "53300"
_TOO_MANY_CONNECTIONS_TEXTS = (
    "too many clients",
    "too many connections",
    "remaining connection slots are reserved",
)


def is_too_many_connections(error: BaseException) -> bool:
    if getattr(error, "sqlstate", None) == TOO_MANY_CONNECTIONS_SQLSTATE:
        return True
    text = str(error).lower()
    return any(marker in text for marker in _TOO_MANY_CONNECTIONS_TEXTS)


class DsnInvalid(DatabaseUnavailable):
    """The DSN does not parse. Its text came from a Secret, so the message quotes none of it:
    libpq's parse errors quote the offending word, which may be a password or any other
    value that happened to sit under the Secret's key.

    A ``DatabaseUnavailable`` so that callers that only know that one (the worker) still
    treat it as "no database"; the operator and the CLI report it as ``SecretInvalid``.
    """


@dataclasses.dataclass(frozen=True)
class RunningAttempt:
    """What a worker learns when its fence check succeeds (the retry rules are read only when
    a body fails: ``retry_rules``)."""

    policy_key: str
    entry_id: str
    attempt: int
    fence_token: uuid.UUID


# --- connections and secrets ---------------------------------------------------------------

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^@/\s]*)@")
_KEYWORD_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def sanitize_error(text: str, *, secrets: Iterable[str] = (), limit: int = ERROR_TEXT_LIMIT) -> str:
    """Make an error message safe to store and show: no credentials, bounded length.

    Removes the given secrets verbatim, the userinfo of any ``scheme://user:pw@host`` URL and
    ``password=...`` keywords of libpq DSNs, then truncates to ``limit`` characters.
    """
    cleaned = text
    for secret in secrets:
        if secret and len(secret) >= 3:
            cleaned = cleaned.replace(secret, "***")
    cleaned = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", cleaned)
    cleaned = _KEYWORD_PASSWORD.sub(lambda m: f"{m.group(1)}***", cleaned)
    if len(cleaned) > limit:
        cleaned = cleaned[: max(0, limit - 14)] + " …(truncated)"
    return cleaned


# What ``describe_dsn`` may show of a DSN, and what each value must look like to be shown:
# enough to find the server. Anything else in a DSN (a password, options, a value that does
# not look like a host name or a port) is treated as secret.
_SHOWN_DSN_VALUES = {
    "host": re.compile(r"^[A-Za-z0-9._\-:/\[\],]{1,255}$"),
    "hostaddr": re.compile(r"^[0-9A-Fa-f.:,]{1,255}$"),
    "port": re.compile(r"^[0-9,]{1,40}$"),
    "dbname": re.compile(r"^[A-Za-z0-9_\-.]{1,63}$"),
}


def _dsn_params(dsn: str) -> dict[str, str] | None:
    try:
        return {key: str(value) for key, value in conninfo.conninfo_to_dict(dsn).items()}
    except psycopg.Error:
        return None


def _shown(params: Mapping[str, str], key: str) -> str | None:
    value = params.get(key)
    return value if value and _SHOWN_DSN_VALUES[key].match(value) else None


def dsn_secrets(dsn: str) -> tuple[str, ...]:
    """The parts of a DSN that must never be shown: the DSN itself and every value in it
    that ``describe_dsn`` does not show (the password, options, anything odd)."""
    params = _dsn_params(dsn) or {}
    hidden = [
        value
        for key, value in params.items()
        if value and (key not in _SHOWN_DSN_VALUES or _shown(params, key) is None)
    ]
    return (dsn, *sorted(set(hidden), key=len, reverse=True))


def check_dsn(dsn: str, *, where: str) -> None:
    """Raise ``DsnInvalid`` naming ``where`` the DSN came from — never what it says."""
    if _dsn_params(dsn) is None:
        raise DsnInvalid(
            f"{where} is not a PostgreSQL DSN (expected postgresql://user@host:5432/dbname or "
            "key=value pairs such as host=... dbname=...; its content is not shown because "
            "it came from a Secret)"
        )


def describe_dsn(dsn: str) -> str:
    """``database "x" on host:port`` — enough to find the server, nothing secret."""
    params = _dsn_params(dsn)
    if params is None:
        return "the configured database (its DSN does not parse)"
    host = _shown(params, "host") or _shown(params, "hostaddr") or "localhost"
    port = _shown(params, "port") or ("5432" if "port" not in params else "?")
    return f'database "{_shown(params, "dbname") or "?"}" on {host}:{port}'


def sanitize_database_error(text: str, *, dsn: str) -> str:
    """A libpq or server message with every secret value of ``dsn`` removed — including
    values too short to replace everywhere, where libpq quotes them (``"b"``)."""
    secrets = dsn_secrets(dsn)
    for secret in secrets:
        text = text.replace(f'"{secret}"', '"***"')
    return sanitize_error(text, secrets=secrets)


def unavailable(error: BaseException, *, dsn: str, doing: str) -> DatabaseUnavailable:
    """Translate a psycopg error into ``DatabaseUnavailable`` without any credential in it."""
    reason = sanitize_database_error(str(error).strip() or type(error).__name__, dsn=dsn)
    if is_too_many_connections(error):
        return TooManyConnections(
            f"PostgreSQL refused a connection while {doing} ({describe_dsn(dsn)}): {reason} — "
            "the server's connection slots are used up (max_connections): the DSN is fine. "
            "Raise max_connections, put a connection pooler in front, or lower the "
            "operator's CELERY_RECONCILER_MAX_DATABASE_CONNECTIONS (chart value "
            "operator.maxDatabaseConnections) or the workers' concurrency; nothing was "
            "lost, the next sweep retries"
        )
    return DatabaseUnavailable(
        f"PostgreSQL unavailable while {doing} ({describe_dsn(dsn)}): {reason} — check that "
        "the database is up and that the DSN (spec.source.databaseSecretRef, --dsn or "
        "CELERY_RECONCILER_DSN) is right; nothing was lost, the next sweep retries"
    )


def not_permitted(error: BaseException, *, dsn: str, doing: str) -> DatabaseUnavailable:
    """A worker login refused by our schema, without any credential in the message: the
    fix is a GRANT (or a migration the operator has not run yet), not a check of the
    server."""
    reason = sanitize_database_error(str(error).strip() or type(error).__name__, dsn=dsn)
    return DatabaseUnavailable(
        f"the worker's login may not use the ledger while {doing} ({describe_dsn(dsn)}): "
        f"{reason} — it needs the worker role's grants on schema {SCHEMA}: run part 2 of "
        "`celery-reconciler grants` as the operator's login, once the operator has created "
        "or migrated the schema (its first sweep); deliveries wait in the queue meanwhile"
    )


# TCP keepalives, so a connection whose peer vanished (a half-open socket after a network
# cut or a server host that died) fails in tens of seconds instead of blocking forever.
KEEPALIVES_IDLE_SECONDS = 10
KEEPALIVES_INTERVAL_SECONDS = 5
KEEPALIVES_COUNT = 3


def connect(
    dsn: str,
    *,
    application_name: str = "celery-reconciler",
    connect_timeout_seconds: int = 5,
    tcp_user_timeout_seconds: float = 30.0,
    statement_timeout_seconds: float | None = None,
    lock_timeout_seconds: float | None = None,
) -> psycopg.Connection[Any]:
    """An autocommit connection, or ``DatabaseUnavailable`` naming the server (not the DSN).

    ``tcp_user_timeout_seconds`` bounds how long sent data may stay unacknowledged before
    the connection fails (libpq's ``tcp_user_timeout``). ``statement_timeout_seconds`` and
    ``lock_timeout_seconds`` (None: the server's default) are set on the session — not as
    ``options`` in the DSN, which would replace the user's own.
    """
    check_dsn(dsn, where="the DSN (spec.source.databaseSecretRef, --dsn or CELERY_RECONCILER_DSN)")
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            application_name=application_name,
            connect_timeout=connect_timeout_seconds,
            tcp_user_timeout=int(tcp_user_timeout_seconds * 1000),
            keepalives=1,
            keepalives_idle=KEEPALIVES_IDLE_SECONDS,
            keepalives_interval=KEEPALIVES_INTERVAL_SECONDS,
            keepalives_count=KEEPALIVES_COUNT,
        )
    except psycopg.Error as error:
        raise unavailable(error, dsn=dsn, doing="connecting") from None
    try:
        for setting, seconds in (
            ("statement_timeout", statement_timeout_seconds),
            ("lock_timeout", lock_timeout_seconds),
        ):
            if seconds is not None:
                conn.execute(
                    sql.SQL("SET {} = {}").format(
                        sql.Identifier(setting), sql.Literal(max(1, round(seconds * 1000)))
                    )
                )
    except psycopg.Error as error:
        conn.close()
        raise unavailable(error, dsn=dsn, doing="configuring the session") from None
    return conn


# --- schema --------------------------------------------------------------------------------


# An attempt's history row is written once, when the attempt ends (succeeded, failed or
# lost), from the entry row the ending statement just updated: the worker's fence check is
# then a single-row UPDATE, the least a per-task statement can be, and a running attempt is
# read from the entry row itself (``history``). A ledger of the previous schema may still
# hold ``running`` history rows: those are completed in place instead of inserted.
# ``ended`` names a CTE returning the entry's ``policy_key, entry_id, attempt, fence_token,
# worker, dispatched_at, started_at, incarnation``; the expressions may use its columns
# through the alias ``ended``.
def attempt_ended(
    ended: str, *, outcome: str, error: str = "NULL", retry_at: str = "NULL"
) -> sql.Composed:
    return sql.SQL(
        """
        {completed} AS (
            UPDATE {attempts} a SET outcome = {outcome}, error = {error}, finished_at = now(),
                retry_at = {retry_at}
            FROM {ended} ended
            WHERE a.fence_token = ended.fence_token AND a.outcome = 'running'
        ), {recorded} AS (
            INSERT INTO {attempts} (policy_key, entry_id, attempt, fence_token, worker,
                outcome, error, dispatched_at, started_at, finished_at, retry_at, incarnation)
            SELECT ended.policy_key, ended.entry_id, ended.attempt, ended.fence_token,
                ended.worker, {outcome}, {error}, ended.dispatched_at,
                coalesce(ended.started_at, now()), now(), {retry_at}, ended.incarnation
            FROM {ended} ended
            WHERE NOT EXISTS (SELECT 1 FROM {attempts} a
                              WHERE a.fence_token = ended.fence_token AND a.outcome = 'running')
        )
        """
    ).format(
        ended=sql.Identifier(ended),
        completed=sql.Identifier(f"{ended}_completed"),
        recorded=sql.Identifier(f"{ended}_recorded"),
        attempts=ATTEMPTS,
        outcome=sql.Literal(outcome),
        error=sql.SQL(error),
        retry_at=sql.SQL(retry_at),
    )


# --- the worker's interface: functions, not tables --------------------------------------------
#
# A worker's login reaches the ledger only through these functions (see docs/operations.md,
# "Trust boundaries", and ``celery_reconciler.ledger_roles``, which prints the GRANTs). They
# are ``SECURITY DEFINER``: they run with the rights of the schema's owner (the operator's
# role, which created them), so the worker's role needs no right on any table — it cannot
# read another policy's entries, end incarnations or mark entries except through a function,
# and each function acts only on what its caller proves it holds: an attempt by its fence
# token (a random UUID that reaches a worker as the task id of its message, and that no
# worker login can list), an incarnation by its id (a random UUID only its process and that
# process's guardian know). Row-level security was the alternative; it decides by the
# session's role, and every worker shares one, so it could not tell one worker's incarnation
# from another's without trusting what the session says about itself.
#
# PL/pgSQL, not SQL: its plans are cached for the session, so the fence check costs one
# planned statement per task as before. ``search_path`` is pinned (every name below is
# schema-qualified) so that a caller's temporary objects cannot stand in for ours.
# ``#variable_conflict use_column``: a name that is both a column and an output column means
# the column. A later change to a function replaces it in a migration of its own.


@dataclasses.dataclass(frozen=True)
class WorkerFunction:
    """One function of the worker's interface: its name, typed parameters, result and body."""

    name: str
    parameters: tuple[tuple[str, str], ...]  # (name, type)
    returns: str
    body: sql.Composable

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(SCHEMA, self.name)

    @property
    def signature(self) -> sql.Composed:
        """``schema.name(type, ...)``: how GRANT and REVOKE name this function."""
        return sql.SQL("{}({})").format(
            self.identifier, sql.SQL(", ").join(sql.SQL(kind) for _, kind in self.parameters)
        )

    def create(self) -> sql.Composed:
        return sql.SQL(
            """
            CREATE FUNCTION {identifier}({parameters}) RETURNS {returns}
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
            AS $function$
            #variable_conflict use_column
            {declare}
            BEGIN
            {body}
            END
            $function$
            """
        ).format(
            identifier=self.identifier,
            parameters=sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
                for name, kind in self.parameters
            ),
            returns=sql.SQL(self.returns),
            declare=self._declare(),
            body=self.body,
        )

    def _declare(self) -> sql.Composable:
        """A scalar function returns its ``result`` variable; a set or nothing needs none."""
        if self.returns.startswith(("TABLE", "void")):
            return sql.SQL("")
        return sql.SQL("DECLARE result {};").format(sql.SQL(self.returns))

    def revoke_from_public(self) -> sql.Composed:
        # Functions are executable by PUBLIC unless revoked: only the GRANTs may open them.
        return sql.SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(self.signature)


# Bodies an incarnation finished, marked succeeded in one batch by its next heartbeat (or by
# ``worker_record_success`` inside a fenced commit): a worker spends a single one-row statement
# per task, its fence check. Until the mark the entry stays ``running`` under a live
# incarnation — nothing re-dispatches it — and if the process dies first, the source shows
# it processed and the sweep settles it. ``p_finished`` is the function's uuid[] parameter.
_MARK_FINISHED = sql.SQL(
    """
    finished AS (
        UPDATE {entries} SET state = 'succeeded', lease_deadline = NULL,
            next_attempt_at = NULL, finished_at = now(), updated_at = now()
        WHERE fence_token = ANY(p_finished) AND state = 'running'
        RETURNING policy_key, entry_id, attempt, fence_token, worker, dispatched_at,
            started_at, incarnation
    ), {history}
    """
).format(entries=ENTRIES, history=attempt_ended("finished", outcome="succeeded"))

# The fence: a worker may run the body only if its task id is the entry's current fence
# token, the entry is still queued (not already running, retried or finished) and the lease
# is live — and, for a worker with an incarnation, only while that incarnation is live and
# heartbeated within half its timeout. One single-row UPDATE checks and claims at once, so two
# deliveries cannot both pass. ``FOR SHARE`` on the incarnation row makes the operator's
# ending of it (an UPDATE of that row) and this start serialize: whichever commits first
# wins, and a start that waited re-reads the row and sees it ended. The lease is never
# shorter than the heartbeat timeout, so the backstop cannot fire between two renewals.
_START_ATTEMPT_BODY = sql.SQL(
    """
    RETURN QUERY WITH started AS (
        UPDATE {entries} e SET
            state = 'running',
            attempt = e.attempt + 1,
            worker = p_worker,
            incarnation = p_incarnation,
            started_at = now(),
            finished_at = NULL,
            lease_deadline = now() + make_interval(secs => greatest(
                (SELECT p.lease_seconds FROM {policies} p WHERE p.policy_key = e.policy_key),
                coalesce(p_heartbeat_timeout_seconds, 0))),
            updated_at = now()
        WHERE e.fence_token = p_fence_token
          AND (p_entry_id IS NULL OR e.entry_id = p_entry_id)
          AND e.state = 'queued'
          AND e.lease_deadline > now()
          AND (p_incarnation IS NULL OR EXISTS (
                SELECT 1 FROM {incarnations} i
                WHERE i.id = p_incarnation AND i.ended_at IS NULL
                  AND i.heartbeat_at > now()
                      - make_interval(secs => i.heartbeat_timeout_seconds / 2)
                FOR SHARE))
        RETURNING e.policy_key, e.entry_id, e.attempt, e.fence_token
    )
    SELECT * FROM started;
    """
).format(entries=ENTRIES, policies=POLICIES, incarnations=INCARNATIONS)

_RETRY_RULES_BODY = sql.SQL(
    """
    RETURN QUERY SELECT p.max_attempts, p.initial_delay_seconds, p.backoff_factor,
        p.max_delay_seconds, p.jitter
    FROM {policies} p WHERE p.policy_key = p_policy_key;
    """
).format(policies=POLICIES)

_RECORD_SUCCESS_BODY = sql.SQL(
    """
    WITH {mark_finished} SELECT count(*) > 0 INTO result FROM finished;
    RETURN result;
    """
).format(mark_finished=_MARK_FINISHED)

_RECORD_FAILURE_BODY = sql.SQL(
    """
    WITH failed AS (
        UPDATE {entries} SET
            state = CASE WHEN p_retry_in_seconds IS NULL THEN 'dead' ELSE 'retry_wait' END,
            next_attempt_at = now() + make_interval(secs => p_retry_in_seconds),
            last_error = p_error,
            lease_deadline = NULL,
            finished_at = now(),
            updated_at = now()
        WHERE fence_token = p_fence_token AND state = 'running'
        RETURNING policy_key, entry_id, attempt, fence_token, worker, dispatched_at,
            started_at, incarnation, state, next_attempt_at
    ), {history}
    SELECT state INTO result FROM failed;
    RETURN result;
    """
).format(
    entries=ENTRIES,
    history=attempt_ended(
        "failed", outcome="failed", error="p_error", retry_at="ended.next_attempt_at"
    ),
)

_REGISTER_INCARNATION_BODY = sql.SQL(
    """
    INSERT INTO {incarnations} (id, hostname, pid, pod_name, pod_namespace, pod_uid,
        container_id, container_name, container_started_at, heartbeat_timeout_seconds)
    VALUES (p_id, p_hostname, p_pid, p_pod_name, p_pod_namespace, p_pod_uid,
        p_container_id, p_container_name, p_container_started_at, p_heartbeat_timeout_seconds);
    """
).format(incarnations=INCARNATIONS)

# One statement per incarnation per interval, however many bodies it runs: renew the
# incarnation and push the lease of each attempt it runs, so a long body never outlives it.
# Attempts whose body finished but whose outcome could not be recorded (the database was
# away) are not renewed but released: their lease ends now, and the next sweep settles them
# from the table or re-dispatches them. The lease is never shorter than the incarnation's
# heartbeat timeout, so the backstop cannot fire between the renewals of a live worker.
_HEARTBEAT_BODY = sql.SQL(
    """
    WITH {mark_finished}, me AS (
        UPDATE {incarnations} SET heartbeat_at = now()
        WHERE id = p_incarnation AND ended_at IS NULL
        RETURNING id, heartbeat_timeout_seconds
    ), renewed AS (
        UPDATE {entries} e SET lease_deadline = CASE
            WHEN e.fence_token = ANY(p_unrecorded) THEN now()
            ELSE now() + make_interval(
                secs => greatest(p.lease_seconds, me.heartbeat_timeout_seconds))
        END
        FROM {policies} p, me
        WHERE e.incarnation = me.id AND e.state = 'running' AND p.policy_key = e.policy_key
          AND NOT e.fence_token = ANY(p_finished)
    )
    SELECT count(*) > 0 INTO result FROM me;
    RETURN result;
    """
).format(
    incarnations=INCARNATIONS, entries=ENTRIES, policies=POLICIES, mark_finished=_MARK_FINISHED
)

_INCARNATION_IS_LIVE_BODY = sql.SQL(
    """
    SELECT i.ended_at IS NULL
        AND i.heartbeat_at > now() - make_interval(secs => i.heartbeat_timeout_seconds / 2)
    INTO result FROM {incarnations} i WHERE i.id = p_incarnation;
    RETURN coalesce(result, false);
    """
).format(incarnations=INCARNATIONS)

_END_INCARNATIONS_BODY = sql.SQL(
    """
    UPDATE {incarnations} SET ended_at = now(), ended_reason = p_reason
    WHERE id = ANY(p_incarnations) AND ended_at IS NULL;
    GET DIAGNOSTICS result = ROW_COUNT;
    RETURN result;
    """
).format(incarnations=INCARNATIONS)

START_ATTEMPT = WorkerFunction(
    "worker_start_attempt",
    (
        ("p_fence_token", "uuid"),
        ("p_entry_id", "text"),
        ("p_worker", "text"),
        ("p_incarnation", "uuid"),
        ("p_heartbeat_timeout_seconds", "double precision"),
    ),
    "TABLE (policy_key text, entry_id text, attempt integer, fence_token uuid)",
    _START_ATTEMPT_BODY,
)
RETRY_RULES = WorkerFunction(
    "worker_retry_rules",
    (("p_policy_key", "text"),),
    "TABLE (max_attempts integer, initial_delay_seconds double precision, "
    "backoff_factor double precision, max_delay_seconds double precision, jitter boolean)",
    _RETRY_RULES_BODY,
)
RECORD_SUCCESS = WorkerFunction(
    "worker_record_success", (("p_finished", "uuid[]"),), "boolean", _RECORD_SUCCESS_BODY
)
RECORD_FAILURE = WorkerFunction(
    "worker_record_failure",
    (("p_fence_token", "uuid"), ("p_error", "text"), ("p_retry_in_seconds", "double precision")),
    "text",
    _RECORD_FAILURE_BODY,
)
REGISTER_INCARNATION = WorkerFunction(
    "worker_register_incarnation",
    (
        ("p_id", "uuid"),
        ("p_hostname", "text"),
        ("p_pid", "integer"),
        ("p_pod_name", "text"),
        ("p_pod_namespace", "text"),
        ("p_pod_uid", "text"),
        ("p_container_id", "text"),
        ("p_container_name", "text"),
        ("p_container_started_at", "timestamptz"),
        ("p_heartbeat_timeout_seconds", "double precision"),
    ),
    "void",
    _REGISTER_INCARNATION_BODY,
)
HEARTBEAT = WorkerFunction(
    "worker_heartbeat",
    (("p_incarnation", "uuid"), ("p_unrecorded", "uuid[]"), ("p_finished", "uuid[]")),
    "boolean",
    _HEARTBEAT_BODY,
)
INCARNATION_IS_LIVE = WorkerFunction(
    "worker_incarnation_is_live",
    (("p_incarnation", "uuid"),),
    "boolean",
    _INCARNATION_IS_LIVE_BODY,
)
END_INCARNATIONS = WorkerFunction(
    "worker_end_incarnations",
    (("p_incarnations", "uuid[]"), ("p_reason", "text")),
    "integer",
    _END_INCARNATIONS_BODY,
)
# Everything a worker login may call (``celery_reconciler.ledger_roles`` grants these).
WORKER_FUNCTIONS = (
    REGISTER_INCARNATION,
    HEARTBEAT,
    START_ATTEMPT,
    RECORD_SUCCESS,
    RETRY_RULES,
    RECORD_FAILURE,
    INCARNATION_IS_LIVE,
    END_INCARNATIONS,
)


# Every version runs online (``migrations``): its statements must be idempotent where the
# version is more than one transaction (it may be run again after dying half-way), indexes
# on tables with history are built concurrently and data changes are batched.
MIGRATIONS: tuple[migrations.Migration, ...] = (
    (
        1,
        (
            sql.SQL(
                """
                CREATE TABLE {policies} (
                    policy_key text PRIMARY KEY,
                    max_attempts integer NOT NULL CHECK (max_attempts >= 1),
                    initial_delay_seconds double precision NOT NULL,
                    backoff_factor double precision NOT NULL,
                    max_delay_seconds double precision NOT NULL,
                    jitter boolean NOT NULL,
                    lease_seconds double precision NOT NULL CHECK (lease_seconds > 0),
                    task_name text NOT NULL,
                    queue text NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now()
                )
                """
            ).format(policies=POLICIES),
            sql.SQL(
                """
                CREATE TABLE {entries} (
                    policy_key text NOT NULL,
                    entry_id text NOT NULL,
                    state text NOT NULL CHECK (state IN
                        ('queued', 'running', 'retry_wait', 'succeeded', 'dead')),
                    attempt integer NOT NULL DEFAULT 0,
                    fence_token uuid UNIQUE,
                    lease_deadline timestamptz,
                    next_attempt_at timestamptz,
                    worker text,
                    last_error text,
                    dispatched_at timestamptz,
                    started_at timestamptz,
                    finished_at timestamptz,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    updated_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (policy_key, entry_id)
                )
                """
            ).format(entries=ENTRIES),
            # Sweeps only ever look at unfinished rows; succeeded rows (the bulk, forever)
            # stay out of this index so its size follows the backlog.
            sql.SQL(
                "CREATE INDEX entries_unfinished ON {entries} (policy_key, state) "
                "WHERE state <> 'succeeded'"
            ).format(entries=ENTRIES),
            sql.SQL(
                """
                CREATE TABLE {attempts} (
                    id bigserial PRIMARY KEY,
                    policy_key text NOT NULL,
                    entry_id text NOT NULL,
                    attempt integer NOT NULL,
                    fence_token uuid NOT NULL,
                    worker text,
                    outcome text NOT NULL CHECK (outcome IN
                        ('running', 'succeeded', 'failed', 'lost')),
                    error text,
                    dispatched_at timestamptz,
                    started_at timestamptz NOT NULL,
                    finished_at timestamptz,
                    retry_at timestamptz
                )
                """
            ).format(attempts=ATTEMPTS),
            sql.SQL(
                "CREATE INDEX attempts_by_entry ON {attempts} (policy_key, entry_id, id)"
            ).format(attempts=ATTEMPTS),
            sql.SQL(
                "CREATE INDEX attempts_running ON {attempts} (fence_token) "
                "WHERE outcome = 'running'"
            ).format(attempts=ATTEMPTS),
        ),
    ),
    (
        2,
        (
            # The operator turns finished attempts into Prometheus counters by time window.
            migrations.ConcurrentIndex(
                SCHEMA,
                "attempts_finished",
                sql.SQL(
                    "{attempts} (policy_key, finished_at) WHERE finished_at IS NOT NULL"
                ).format(attempts=ATTEMPTS),
            ),
        ),
    ),
    (
        3,
        (
            # One row per worker process life. Liveness is a fact about an incarnation (its
            # heartbeat, or the pod event that killed its container), never about a name.
            sql.SQL(
                """
                CREATE TABLE IF NOT EXISTS {incarnations} (
                    id uuid PRIMARY KEY,
                    hostname text NOT NULL,
                    pid integer NOT NULL,
                    pod_name text,
                    pod_namespace text,
                    pod_uid text,
                    container_id text,
                    container_name text,
                    heartbeat_timeout_seconds double precision NOT NULL
                        CHECK (heartbeat_timeout_seconds > 0),
                    started_at timestamptz NOT NULL DEFAULT now(),
                    heartbeat_at timestamptz NOT NULL DEFAULT now(),
                    ended_at timestamptz,
                    ended_reason text
                )
                """
            ).format(incarnations=INCARNATIONS),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS incarnations_live_by_pod ON {incarnations} (pod_uid) "
                "WHERE ended_at IS NULL"
            ).format(incarnations=INCARNATIONS),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS incarnations_live ON {incarnations} (heartbeat_at) "
                "WHERE ended_at IS NULL"
            ).format(incarnations=INCARNATIONS),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS incarnations_ended ON {incarnations} (ended_at) "
                "WHERE ended_at IS NOT NULL"
            ).format(incarnations=INCARNATIONS),
            # Rows running under a worker of the previous schema keep a NULL incarnation and
            # are judged by their lease alone, as before the upgrade.
            sql.SQL("ALTER TABLE {entries} ADD COLUMN IF NOT EXISTS incarnation uuid").format(
                entries=ENTRIES
            ),
            sql.SQL("ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS incarnation uuid").format(
                attempts=ATTEMPTS
            ),
            migrations.ConcurrentIndex(
                SCHEMA,
                "entries_running_by_incarnation",
                sql.SQL("{entries} (incarnation) WHERE state = 'running'").format(entries=ENTRIES),
            ),
        ),
    ),
    (
        4,
        (
            # Status in proportion to the backlog, not to history: the number of succeeded
            # entries is a tally the operator folds new successes into (``fold_successes``),
            # so no status read counts the succeeded rows, which grow forever — or would,
            # without retention (``prune``). ``counted`` marks a succeeded row already in the
            # tally; today's succeeded rows are, and the tally starts from their count.
            # Online, in steps: the column (a default is not a rewrite) and the table; then
            # the unfinished rows marked uncounted, in batches (a row that succeeds meanwhile
            # keeps ``counted`` and is in the count); then the count of what is counted — a
            # success after the batches is uncounted, and folded by the operator instead.
            sql.SQL(
                "ALTER TABLE {entries} ADD COLUMN IF NOT EXISTS counted boolean NOT NULL "
                "DEFAULT true"
            ).format(entries=ENTRIES),
            sql.SQL("ALTER TABLE {entries} ALTER COLUMN counted SET DEFAULT false").format(
                entries=ENTRIES
            ),
            sql.SQL(
                """
                CREATE TABLE IF NOT EXISTS {tallies} (
                    policy_key text PRIMARY KEY,
                    succeeded bigint NOT NULL DEFAULT 0 CHECK (succeeded >= 0)
                )
                """
            ).format(tallies=TALLIES),
            migrations.Backfill(
                sql.SQL(
                    """
                    WITH batch AS (
                        SELECT policy_key, entry_id FROM {entries}
                        WHERE state <> 'succeeded' AND counted LIMIT %(batch)s
                    ), changed AS (
                        UPDATE {entries} e SET counted = false FROM batch
                        WHERE e.policy_key = batch.policy_key AND e.entry_id = batch.entry_id
                          AND e.state <> 'succeeded' AND e.counted
                        RETURNING 1
                    )
                    SELECT (SELECT count(*) FROM batch), NULL
                    """
                ).format(entries=ENTRIES)
            ),
            sql.SQL(
                "INSERT INTO {tallies} (policy_key, succeeded) "
                "SELECT policy_key, count(*) FROM {entries} WHERE state = 'succeeded' AND counted "
                "GROUP BY policy_key ON CONFLICT (policy_key) DO NOTHING"
            ).format(tallies=TALLIES, entries=ENTRIES),
            migrations.ConcurrentIndex(
                SCHEMA,
                "entries_uncounted",
                sql.SQL("{entries} (policy_key) WHERE state = 'succeeded' AND NOT counted").format(
                    entries=ENTRIES
                ),
            ),
            # Retention reads the oldest finished rows of a policy first.
            migrations.ConcurrentIndex(
                SCHEMA,
                "entries_succeeded_by_age",
                sql.SQL("{entries} (policy_key, finished_at) WHERE state = 'succeeded'").format(
                    entries=ENTRIES
                ),
            ),
        ),
    ),
    (
        5,
        (
            # A stable interface for autoscalers (KEDA's postgresql trigger) and dashboards:
            # per policy, what waits for a worker and what workers run. Its columns only
            # ever grow; read it with nothing but SELECT on the view (see operations.md).
            sql.SQL(
                """
                CREATE VIEW {backlog} AS
                SELECT p.policy_key,
                    count(e.entry_id) FILTER (WHERE e.state = 'queued') AS queued,
                    count(e.entry_id) FILTER (WHERE e.state = 'running') AS running,
                    count(e.entry_id) FILTER (WHERE e.state = 'retry_wait'
                                                AND e.next_attempt_at <= now()) AS retries_due
                FROM {policies} p
                LEFT JOIN {entries} e ON e.policy_key = p.policy_key
                    AND e.state IN ('queued', 'running', 'retry_wait')
                GROUP BY p.policy_key
                """
            ).format(backlog=BACKLOG, policies=POLICIES, entries=ENTRIES),
        ),
    ),
    (
        6,
        (
            # Active-active operator replicas: who may sweep each policy (the holder of its
            # Lease and that Lease's fencing token), and every sweep's interval under that
            # owner, so that "never two replicas sweeping one policy" can be read from the
            # ledger. Only the operator reads or writes them (celery_reconciler.ledger).
            sql.SQL(
                """
                CREATE TABLE {owners} (
                    policy_key text PRIMARY KEY,
                    holder text NOT NULL,
                    token bigint NOT NULL,
                    since timestamptz NOT NULL DEFAULT clock_timestamp()
                )
                """
            ).format(owners=OWNERS),
            sql.SQL(
                """
                CREATE TABLE {sweeps} (
                    id bigserial PRIMARY KEY,
                    policy_key text NOT NULL,
                    holder text NOT NULL,
                    token bigint NOT NULL,
                    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                    finished_at timestamptz,
                    ended text CHECK (ended IN ('finished', 'failed', 'taken_over'))
                )
                """
            ).format(sweeps=SWEEPS),
            sql.SQL("CREATE INDEX sweeps_by_policy ON {sweeps} (policy_key, started_at)").format(
                sweeps=SWEEPS
            ),
        ),
    ),
    (
        7,
        (
            # The container instance a process runs in, on the node's own clock: when its
            # container's PID 1 started (``/proc/1/stat`` + ``/proc/stat`` btime). Readable on
            # cgroup v1 and v2 alike, and compared only with the kubelet's ``startedAt`` of the
            # same node, never with the database's clock. Nullable: older workers lack it.
            sql.SQL(
                "ALTER TABLE {incarnations} ADD COLUMN container_started_at timestamptz"
            ).format(incarnations=INCARNATIONS),
        ),
    ),
    (
        8,
        (
            # Which work each policy holds, so that the database — not a comparison of
            # Kubernetes objects — decides when two policies would run the same rows: across
            # namespaces, Secrets and DSN spellings, one database has one such table. Only the
            # operator reads or writes it (celery_reconciler.overlaps).
            sql.SQL(
                """
                CREATE TABLE {work} (
                    policy_key text PRIMARY KEY,
                    policy_uid text NOT NULL,
                    created text NOT NULL,
                    table_oid oid,
                    table_name text NOT NULL,
                    pending text NOT NULL,
                    task_name text NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now()
                )
                """
            ).format(work=POLICY_WORK),
            sql.SQL("CREATE INDEX policy_work_by_table ON {work} (table_oid)").format(
                work=POLICY_WORK
            ),
        ),
    ),
    (
        9,
        # The worker's narrow interface (``WORKER_FUNCTIONS``): a worker login needs EXECUTE
        # on these and no right on any table. Workers of earlier releases still write the
        # tables directly and keep working with a login that may.
        tuple(
            statement
            for function in WORKER_FUNCTIONS
            for statement in (function.create(), function.revoke_from_public())
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def ensure_schema(
    conn: psycopg.Connection[Any], *, versions: Sequence[migrations.Migration] = MIGRATIONS
) -> int:
    """Create or migrate our schema (to the last of ``versions``); safe to call from many
    processes at once, and while workers run bodies on the ledger (``migrations``).

    A cheap read answers the common case (already current) without locking. Otherwise the
    versions not applied yet run one after another under an advisory lock, so two operators
    (or an operator and a worker) starting together never race on ``CREATE TABLE``. Returns
    the version now in place.
    """
    wanted = {version for version, _ in versions}
    if _applied_versions(conn) >= wanted:
        return max(wanted)
    migrations.apply(
        conn,
        migrations=versions,
        lock_id=MIGRATION_LOCK_ID,
        prepare=(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(_SCHEMA),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(_MIGRATIONS_TABLE),
        ),
        applied=functools.partial(_applied_versions, conn),
        record=sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(_MIGRATIONS_TABLE),
    )
    return max(wanted)


def _applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", [f"{SCHEMA}.schema_migrations"]
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    return {
        row[0] for row in conn.execute(sql.SQL("SELECT version FROM {}").format(_MIGRATIONS_TABLE))
    }


# --- worker side ---------------------------------------------------------------------------
#
# Each statement a worker runs is one call of its function (above): the SQL that touches the
# tables runs with the owner's rights, the worker's login needs only EXECUTE.


def _call(function: WorkerFunction, *, select: str = "*") -> sql.Composed:
    """``SELECT ... FROM schema.function(%(name)s::type, ...)``, bound by parameter name
    (without the ``p_`` prefix), each cast so the call resolves to exactly this function."""
    return sql.SQL("SELECT {select} FROM {identifier}({arguments})").format(
        select=sql.SQL(select),
        identifier=function.identifier,
        arguments=sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Placeholder(name.removeprefix("p_")), sql.SQL(kind))
            for name, kind in function.parameters
        ),
    )


_START_ATTEMPT = _call(START_ATTEMPT)


def start_attempt(
    conn: psycopg.Connection[Any],
    *,
    fence_token: str,
    entry_id: str | None,
    worker: str,
    incarnation: uuid.UUID | None = None,
    heartbeat_timeout_seconds: float | None = None,
) -> RunningAttempt | None:
    """Claim the right to run the body, or ``None`` for a stale or foreign delivery (or an
    incarnation that is no longer live: see ``incarnation_is_live``).

    ``entry_id`` (when known) must match the ledger row of the fence token too, so a
    message can never run the body for a different entry than the one it was claimed for.
    """
    try:
        token = uuid.UUID(fence_token)
    except ValueError:
        return None  # not one of our messages: task ids we publish are always UUIDs
    row = conn.execute(
        _START_ATTEMPT,
        {
            "fence_token": token,
            "entry_id": entry_id,
            "worker": worker,
            "incarnation": incarnation,
            "heartbeat_timeout_seconds": heartbeat_timeout_seconds,
        },
    ).fetchone()
    if row is None:
        return None
    policy_key, entry, attempt, fence = row
    return RunningAttempt(policy_key=policy_key, entry_id=entry, attempt=attempt, fence_token=fence)


_RETRY_RULES = _call(RETRY_RULES)


def retry_rules(conn: psycopg.Connection[Any], *, policy_key: str) -> backoff.Retry:
    """The policy's retry rules as the operator last wrote them (read when a body fails)."""
    row = conn.execute(_RETRY_RULES, {"policy_key": policy_key}).fetchone()
    if row is None:
        # The policy was deleted while its body ran: one attempt, no retry.
        return backoff.Retry(
            max_attempts=1,
            initial_delay_seconds=0.0,
            backoff_factor=1.0,
            max_delay_seconds=0.0,
            jitter=False,
        )
    max_attempts, initial, factor, max_delay, jitter = row
    return backoff.Retry(
        max_attempts=max_attempts,
        initial_delay_seconds=initial,
        backoff_factor=factor,
        max_delay_seconds=max_delay,
        jitter=jitter,
    )


_RECORD_SUCCESS = _call(RECORD_SUCCESS)


def record_success(conn: psycopg.Connection[Any], *, fence_token: uuid.UUID) -> bool:
    """Mark the attempt succeeded; ``False`` if it no longer owned the entry (lease lost)."""
    row = conn.execute(_RECORD_SUCCESS, {"finished": [fence_token]}).fetchone()
    return bool(row and row[0])


# The done mark of a fenced commit, sent in one round trip with the COMMIT behind it
# (``task.fenced_transaction``): the COMMIT cannot wait for the mark's answer, so a lost fence
# must fail the statement itself — the transaction is then aborted and the COMMIT commits
# nothing. The failure is a cast of the words "fence lost" (SQLSTATE 22P02), evaluated only
# when the mark matched no row: the CASE on the function's result keeps the planner from
# folding it ahead.
_RECORD_SUCCESS_OR_ABORT = _call(
    RECORD_SUCCESS, select=f"(CASE WHEN {RECORD_SUCCESS.name} THEN '1' ELSE 'fence lost' END)::int"
)
FENCE_LOST_ABORT = psycopg.errors.InvalidTextRepresentation


def record_success_or_abort(conn: psycopg.Connection[Any], *, fence_token: uuid.UUID) -> None:
    """Mark the attempt succeeded inside the caller's transaction, or abort it with
    ``FENCE_LOST_ABORT`` if the attempt no longer owns its entry. Fetches nothing: in
    pipeline mode the answer comes with the COMMIT's."""
    conn.execute(_RECORD_SUCCESS_OR_ABORT, {"finished": [fence_token]})


_RECORD_FAILURE = _call(RECORD_FAILURE)


def record_failure(
    conn: psycopg.Connection[Any],
    *,
    fence_token: uuid.UUID,
    error: str,
    retry_in_seconds: float | None,
) -> str | None:
    """Schedule a retry (``retry_in_seconds``) or dead-letter (``None``) with the error.

    ``error`` must already be sanitized (``sanitize_error``). Returns the new state, or
    ``None`` if the attempt no longer owned the entry.
    """
    row = conn.execute(
        _RECORD_FAILURE,
        {"fence_token": fence_token, "error": error, "retry_in_seconds": retry_in_seconds},
    ).fetchone()
    return None if row is None or row[0] is None else str(row[0])


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    """Who a worker process is, as far as it can tell (the Downward API gives the pod)."""

    hostname: str
    pid: int
    pod_name: str | None = None
    pod_namespace: str | None = None
    pod_uid: str | None = None
    container_id: str | None = None
    container_name: str | None = None
    # When the container's PID 1 started, on the node's clock (see migration 7).
    container_started_at: datetime.datetime | None = None


_REGISTER_INCARNATION = _call(REGISTER_INCARNATION)


def register_incarnation(
    conn: psycopg.Connection[Any],
    *,
    identity: WorkerIdentity,
    heartbeat_timeout_seconds: float,
) -> uuid.UUID:
    """Start a new incarnation (registering counts as its first heartbeat); its id."""
    incarnation = uuid.uuid4()
    conn.execute(
        _REGISTER_INCARNATION,
        {
            "id": incarnation,
            "heartbeat_timeout_seconds": heartbeat_timeout_seconds,
            **dataclasses.asdict(identity),
        },
    )
    return incarnation


_HEARTBEAT = _call(HEARTBEAT)


def heartbeat(
    conn: psycopg.Connection[Any],
    *,
    incarnation: uuid.UUID,
    unrecorded: Sequence[uuid.UUID] = (),
    finished: Sequence[uuid.UUID] = (),
) -> bool:
    """Renew ``incarnation``, mark its ``finished`` attempts succeeded and release its
    ``unrecorded`` ones; ``False`` when the operator has ended it (stop its bodies)."""
    row = conn.execute(
        _HEARTBEAT,
        {
            "incarnation": incarnation,
            "unrecorded": list(unrecorded),
            "finished": list(finished),
        },
    ).fetchone()
    return bool(row and row[0])


_INCARNATION_IS_LIVE = _call(INCARNATION_IS_LIVE)


def incarnation_is_live(conn: psycopg.Connection[Any], *, incarnation: uuid.UUID) -> bool:
    """Whether ``start_attempt`` would accept this incarnation (not ended, heartbeat fresh)."""
    row = conn.execute(_INCARNATION_IS_LIVE, {"incarnation": incarnation}).fetchone()
    return bool(row and row[0])


_END_INCARNATIONS = _call(END_INCARNATIONS)


def end_incarnations(
    conn: psycopg.Connection[Any], *, incarnations: Sequence[uuid.UUID], reason: str
) -> int:
    """Record that the processes of ``incarnations`` are gone (the proof a guardian writes
    after it saw them die): their running entries are the operator's to re-dispatch now.
    How many were still open."""
    row = conn.execute(
        _END_INCARNATIONS, {"incarnations": list(incarnations), "reason": reason}
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0
