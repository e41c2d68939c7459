"""All SQL of our own schema ``celery_reconciler``: the ledger both sides of the queue share.

The ledger lives in the user's database, in a schema we own, so that "is this entry in
flight?" and "did the worker finish it?" are answered by the same transactional store that
holds the entries — no Kubernetes access is needed on the worker side, and a claim can be
checked against the user's rows in one transaction.

Tables (see docs/design.md):

* ``policies``: the retry and lease rules of each policy, upserted by the operator every
  sweep so workers can compute backoff without reading the ProcessingPolicy.
* ``entries``: one row per (policy, entry id) with its state machine
  ``queued -> running -> succeeded | retry_wait | dead``, the fence token (the Celery task id
  of the current dispatch), the lease deadline, the incarnation running it and the last error.
* ``attempts``: the history of each execution, for ``explain`` and for tests that check the
  retry timestamps.
* ``incarnations``: one row per worker process life (pod uid, container id or start time,
  host, pid, heartbeat). Liveness is a fact about an incarnation, never about a name: the
  operator ends one when a pod event proves its container dead, or when its heartbeat is older
  than its timeout — by then the worker has stopped its own bodies (``celery_reconciler_worker``).

Two sides call this module:

* the operator (``reconcile``): ``ensure_schema``, ``upsert_policy``,
  ``end_silent_incarnations``, ``end_pod_incarnations``, ``expire_leases``, ``claim``
  (inside the caller's transaction), ``due_retries``, ``release_claims``, ``retry_dead``,
  counts;
* the worker (``celery_reconciler_worker``): ``register_incarnation``, ``heartbeat`` (which also
  marks finished bodies succeeded, in batches), ``start_attempt`` (the atomic fence check),
  ``record_success`` (inside the body's own transaction: the fenced commit),
  ``retry_rules`` and ``record_failure``.

Every statement is composed with ``psycopg.sql`` from constant text and identifiers; values
are always bound parameters. All times are the database's ``now()``, never a host clock, so
leases mean the same on every machine. Functions expect an autocommit connection and open
their own transaction where they need one, except ``claim``, which runs inside the caller's
claim transaction so the read of the source and the claim commit together.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import conninfo, sql
from psycopg.rows import dict_row

from celery_reconciler import planning, sharding
from celery_reconciler import policy as policy_module

SCHEMA = "celery_reconciler"
# pg_advisory_xact_lock key for migrations: b"celeryrc" read as a big-endian integer.
MIGRATION_LOCK_ID = int.from_bytes(b"celeryrc", "big") & 0x7FFF_FFFF_FFFF_FFFF
ERROR_TEXT_LIMIT = 2000

STATES = ("queued", "running", "retry_wait", "succeeded", "dead")

_SCHEMA = sql.Identifier(SCHEMA)
_POLICIES = sql.Identifier(SCHEMA, "policies")
_ENTRIES = sql.Identifier(SCHEMA, "entries")
_ATTEMPTS = sql.Identifier(SCHEMA, "attempts")
_INCARNATIONS = sql.Identifier(SCHEMA, "incarnations")
_MIGRATIONS_TABLE = sql.Identifier(SCHEMA, "schema_migrations")
_TALLIES = sql.Identifier(SCHEMA, "tallies")
_BACKLOG = sql.Identifier(SCHEMA, "backlog")
_OWNERS = sql.Identifier(SCHEMA, "policy_owners")
_SWEEPS = sql.Identifier(SCHEMA, "sweeps")


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL cannot be reached or failed mid-operation; the message carries no secrets."""


class DsnInvalid(DatabaseUnavailable):
    """The DSN does not parse. Its text came from a Secret, so the message quotes none of it:
    libpq's parse errors quote the offending word, which may be a password or any other
    value that happened to sit under the Secret's key.

    A ``DatabaseUnavailable`` so that callers that only know that one (the worker) still
    treat it as "no database"; the operator and the CLI report it as ``SecretInvalid``.
    """


class LedgerPermissionDenied(RuntimeError):
    """The database user may not create or use our schema; the fix is a GRANT, not a retry."""


class FencedOut(RuntimeError):
    """Another replica owns the policy now (a newer fencing token in ``policy_owners``): this
    one's sweep was refused and must stop. ``current`` is the owner the ledger knows."""

    def __init__(self, message: str, *, current: sharding.Fence | None) -> None:
        super().__init__(message)
        self.current = current


@dataclasses.dataclass(frozen=True)
class Claim:
    """An entry claimed for dispatch: publish a message with ``task id = fence_token``."""

    entry_id: str
    fence_token: uuid.UUID
    again: bool = False  # dispatched before (a retry, a rescue, a lost message): runs next


@dataclasses.dataclass(frozen=True)
class ExpiredLeases:
    retry_now: int  # running attempts lost, entry pending again (counts as a failed attempt)
    dead: int  # running attempts lost with no attempts left
    unstarted: int  # queued messages never started before the lease ran out (lost messages)
    retry_ids: tuple[str, ...] = ()  # the entries of ``retry_now``, due again now


@dataclasses.dataclass(frozen=True)
class RunningAttempt:
    """What a worker learns when its fence check succeeds (the retry rules are read only when
    a body fails: ``retry_rules``)."""

    policy_key: str
    entry_id: str
    attempt: int
    fence_token: uuid.UUID


@dataclasses.dataclass(frozen=True)
class LedgerCounts:
    queued: int
    running: int
    retrying: int
    succeeded: int
    dead: int
    seconds_until_next_due: float | None  # earliest retry or lease deadline; <= 0 means now

    @property
    def in_flight(self) -> int:
        return self.queued + self.running


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    attempt: int
    fence_token: uuid.UUID
    worker: str | None
    outcome: str
    error: str | None
    dispatched_at: datetime.datetime | None
    started_at: datetime.datetime
    finished_at: datetime.datetime | None
    retry_at: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class EntryHistory:
    policy_key: str
    entry_id: str
    state: str
    attempt: int
    fence_token: uuid.UUID | None
    lease_deadline: datetime.datetime | None
    next_attempt_at: datetime.datetime | None
    worker: str | None
    last_error: str | None
    created_at: datetime.datetime
    updated_at: datetime.datetime
    attempts: tuple[AttemptRecord, ...]


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
    return DatabaseUnavailable(
        f"PostgreSQL unavailable while {doing} ({describe_dsn(dsn)}): {reason} — check that "
        "the database is up and that the DSN (spec.source.databaseSecretRef, --dsn or "
        "CELERY_RECONCILER_DSN) is right; nothing was lost, the next sweep retries"
    )


def permission_denied(error: BaseException, *, dsn: str, doing: str) -> LedgerPermissionDenied:
    reason = sanitize_database_error(str(error).strip() or type(error).__name__, dsn=dsn)
    return LedgerPermissionDenied(
        f"the database user may not use the operator's schema {SCHEMA} while {doing} "
        f"({describe_dsn(dsn)}): {reason} — the ledger lives in that schema of the entries' "
        f"database: GRANT CREATE ON DATABASE to the user (the operator creates the schema), "
        f"or create it and GRANT USAGE, CREATE ON SCHEMA {SCHEMA} and SELECT, INSERT, "
        f"UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} to the user of "
        "spec.source.databaseSecretRef (--dsn or CELERY_RECONCILER_DSN for the CLI)"
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
        return unavailable(error, dsn=dsn, doing=doing)
    return error


# The operator's own sessions are bounded: a statement (its reads of the user's table among
# them) may run this long, and a wait for a lock (a worker's fenced commit holding an entry
# row, a migration elsewhere) this long, before it fails and the sweep is retried with
# backoff — rather than holding a policy's loop in a thread nobody can cancel. Workers'
# sessions have neither: their task bodies may legitimately run long.
OPERATOR_STATEMENT_TIMEOUT_SECONDS = 60.0
OPERATOR_LOCK_TIMEOUT_SECONDS = 30.0

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

_MIGRATIONS: tuple[tuple[int, tuple[sql.Composed, ...]], ...] = (
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
            ).format(policies=_POLICIES),
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
            ).format(entries=_ENTRIES),
            # Sweeps only ever look at unfinished rows; succeeded rows (the bulk, forever)
            # stay out of this index so its size follows the backlog.
            sql.SQL(
                "CREATE INDEX entries_unfinished ON {entries} (policy_key, state) "
                "WHERE state <> 'succeeded'"
            ).format(entries=_ENTRIES),
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
            ).format(attempts=_ATTEMPTS),
            sql.SQL(
                "CREATE INDEX attempts_by_entry ON {attempts} (policy_key, entry_id, id)"
            ).format(attempts=_ATTEMPTS),
            sql.SQL(
                "CREATE INDEX attempts_running ON {attempts} (fence_token) "
                "WHERE outcome = 'running'"
            ).format(attempts=_ATTEMPTS),
        ),
    ),
    (
        2,
        (
            # The operator turns finished attempts into Prometheus counters by time window.
            sql.SQL(
                "CREATE INDEX attempts_finished ON {attempts} (policy_key, finished_at) "
                "WHERE finished_at IS NOT NULL"
            ).format(attempts=_ATTEMPTS),
        ),
    ),
    (
        3,
        (
            # One row per worker process life. Liveness is a fact about an incarnation (its
            # heartbeat, or the pod event that killed its container), never about a name.
            sql.SQL(
                """
                CREATE TABLE {incarnations} (
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
            ).format(incarnations=_INCARNATIONS),
            sql.SQL(
                "CREATE INDEX incarnations_live_by_pod ON {incarnations} (pod_uid) "
                "WHERE ended_at IS NULL"
            ).format(incarnations=_INCARNATIONS),
            sql.SQL(
                "CREATE INDEX incarnations_live ON {incarnations} (heartbeat_at) "
                "WHERE ended_at IS NULL"
            ).format(incarnations=_INCARNATIONS),
            sql.SQL(
                "CREATE INDEX incarnations_ended ON {incarnations} (ended_at) "
                "WHERE ended_at IS NOT NULL"
            ).format(incarnations=_INCARNATIONS),
            # Rows running under a worker of the previous schema keep a NULL incarnation and
            # are judged by their lease alone, as before the upgrade.
            sql.SQL("ALTER TABLE {entries} ADD COLUMN incarnation uuid").format(entries=_ENTRIES),
            sql.SQL("ALTER TABLE {attempts} ADD COLUMN incarnation uuid").format(
                attempts=_ATTEMPTS
            ),
            sql.SQL(
                "CREATE INDEX entries_running_by_incarnation ON {entries} (incarnation) "
                "WHERE state = 'running'"
            ).format(entries=_ENTRIES),
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
            sql.SQL(
                "ALTER TABLE {entries} ADD COLUMN counted boolean NOT NULL DEFAULT true"
            ).format(entries=_ENTRIES),
            sql.SQL("ALTER TABLE {entries} ALTER COLUMN counted SET DEFAULT false").format(
                entries=_ENTRIES
            ),
            sql.SQL("UPDATE {entries} SET counted = false WHERE state <> 'succeeded'").format(
                entries=_ENTRIES
            ),
            sql.SQL(
                """
                CREATE TABLE {tallies} (
                    policy_key text PRIMARY KEY,
                    succeeded bigint NOT NULL DEFAULT 0 CHECK (succeeded >= 0)
                )
                """
            ).format(tallies=_TALLIES),
            sql.SQL(
                "INSERT INTO {tallies} (policy_key, succeeded) "
                "SELECT policy_key, count(*) FROM {entries} WHERE state = 'succeeded' "
                "GROUP BY policy_key"
            ).format(tallies=_TALLIES, entries=_ENTRIES),
            sql.SQL(
                "CREATE INDEX entries_uncounted ON {entries} (policy_key) "
                "WHERE state = 'succeeded' AND NOT counted"
            ).format(entries=_ENTRIES),
            # Retention reads the oldest finished rows of a policy first.
            sql.SQL(
                "CREATE INDEX entries_succeeded_by_age ON {entries} (policy_key, finished_at) "
                "WHERE state = 'succeeded'"
            ).format(entries=_ENTRIES),
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
            ).format(backlog=_BACKLOG, policies=_POLICIES, entries=_ENTRIES),
        ),
    ),
    (
        6,
        (
            # Active-active replicas: who may sweep each policy (the holder of its Lease and
            # that Lease's fencing token), and every sweep's interval under that owner, so
            # that "never two replicas sweeping one policy" can be read from the ledger.
            sql.SQL(
                """
                CREATE TABLE {owners} (
                    policy_key text PRIMARY KEY,
                    holder text NOT NULL,
                    token bigint NOT NULL,
                    since timestamptz NOT NULL DEFAULT clock_timestamp()
                )
                """
            ).format(owners=_OWNERS),
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
            ).format(sweeps=_SWEEPS),
            sql.SQL("CREATE INDEX sweeps_by_policy ON {sweeps} (policy_key, started_at)").format(
                sweeps=_SWEEPS
            ),
        ),
    ),
)
SCHEMA_VERSION = _MIGRATIONS[-1][0]


def ensure_schema(conn: psycopg.Connection[Any]) -> int:
    """Create or migrate our schema; safe to call from many processes at once.

    A cheap read answers the common case (already current) without locking. Otherwise the
    migrations run in one transaction under ``pg_advisory_xact_lock``, so two operators (or
    an operator and a worker) starting together never race on ``CREATE TABLE``. Returns the
    version now in place.
    """
    if _applied_versions(conn) >= {version for version, _ in _MIGRATIONS}:
        return SCHEMA_VERSION
    with conn.transaction():
        # A migration may read a whole ledger once (migration 4 counts its successes): the
        # operator's statement timeout is for sweeps, not for this.
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_ID])
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(_SCHEMA))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(_MIGRATIONS_TABLE)
        )
        applied = {
            row[0]
            for row in conn.execute(sql.SQL("SELECT version FROM {}").format(_MIGRATIONS_TABLE))
        }
        for version, statements in _MIGRATIONS:
            if version in applied:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(_MIGRATIONS_TABLE),
                [version],
            )
    return SCHEMA_VERSION


def _applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", [f"{SCHEMA}.schema_migrations"]
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    return {
        row[0] for row in conn.execute(sql.SQL("SELECT version FROM {}").format(_MIGRATIONS_TABLE))
    }


# --- operator side -------------------------------------------------------------------------

# --- sharding: the owner of each policy and its sweeps ---------------------------------------
#
# A replica sweeps a policy only while it holds the policy's Lease (``sharding``); the ledger
# makes that binding where it matters, on the writes. ``begin_sweep`` takes the policy's
# owner row if the sweeper's fencing token is accepted (``sharding.fence_accepts``: the
# compare-and-set below) and opens the sweep's interval; every claim transaction re-checks
# the row under a share lock (``check_fence``), and ``end_sweep`` closes the interval under
# the same check. A takeover must lock the row, so it waits for a claim transaction of the
# previous owner to commit, and closes that owner's open interval at its own clock time:
# after it, the previous owner can commit nothing, and intervals of two owners never
# overlap — which ``sweeps`` shows. Steps of a sweep that are idempotent and already run
# concurrently with rescues (expiry, settling, counting) are not fenced: the fence guards
# what must happen once, claiming and dispatching.

SWEEP_HISTORY_SECONDS = 86400

_TAKE_OWNERSHIP = sql.SQL(
    """
    INSERT INTO {owners} AS o (policy_key, holder, token)
    VALUES (%(policy_key)s, %(holder)s, %(token)s)
    ON CONFLICT (policy_key) DO UPDATE
        SET holder = excluded.holder, token = excluded.token, since = clock_timestamp()
        WHERE o.token < excluded.token OR (o.token = excluded.token AND o.holder = excluded.holder)
    RETURNING policy_key
    """
).format(owners=_OWNERS)
_CURRENT_OWNER = sql.SQL(
    "SELECT holder, token FROM {owners} WHERE policy_key = %(policy_key)s"
).format(owners=_OWNERS)
_CHECK_OWNER = sql.SQL(
    "SELECT 1 FROM {owners} WHERE policy_key = %(policy_key)s AND holder = %(holder)s "
    "AND token = %(token)s FOR SHARE"
).format(owners=_OWNERS)
_CLOSE_PREDECESSORS = sql.SQL(
    """
    UPDATE {sweeps} SET finished_at = clock_timestamp(), ended = 'taken_over'
    WHERE policy_key = %(policy_key)s AND finished_at IS NULL
      AND (holder, token) IS DISTINCT FROM (%(holder)s, %(token)s::bigint)
    """
).format(sweeps=_SWEEPS)
_OPEN_SWEEP = sql.SQL(
    "INSERT INTO {sweeps} (policy_key, holder, token) VALUES (%(policy_key)s, %(holder)s, "
    "%(token)s) RETURNING id"
).format(sweeps=_SWEEPS)
_CLOSE_SWEEP = sql.SQL(
    "UPDATE {sweeps} SET finished_at = clock_timestamp(), ended = %(ended)s "
    "WHERE id = %(id)s AND finished_at IS NULL"
).format(sweeps=_SWEEPS)
_PRUNE_SWEEPS = sql.SQL(
    """
    DELETE FROM {sweeps} WHERE id IN (
        SELECT id FROM {sweeps} WHERE policy_key = %(policy_key)s
          AND started_at < now() - make_interval(secs => %(seconds)s)
        ORDER BY started_at LIMIT 1000)
    """
).format(sweeps=_SWEEPS)


def _fence_params(fence: sharding.Fence) -> dict[str, Any]:
    return {"policy_key": fence.policy_key, "holder": fence.holder, "token": fence.token}


def _fenced_out(conn: psycopg.Connection[Any], fence: sharding.Fence) -> FencedOut:
    row = conn.execute(_CURRENT_OWNER, _fence_params(fence)).fetchone()
    current = None if row is None else sharding.Fence(fence.policy_key, row[0], int(row[1]))
    now = "nobody" if current is None else f"{current.holder} (token {current.token})"
    return FencedOut(
        f"policy {fence.policy_key} is owned by {now} in the ledger: this replica "
        f"({fence.holder}, token {fence.token}) lost its Lease and stops sweeping it",
        current=current,
    )


def begin_sweep(conn: psycopg.Connection[Any], fence: sharding.Fence) -> int:
    """Take (or keep) the policy's owner row and open a sweep interval; its id.

    Raises ``FencedOut`` when the ledger knows a newer owner."""
    with conn.transaction():
        if conn.execute(_TAKE_OWNERSHIP, _fence_params(fence)).fetchone() is None:
            raise _fenced_out(conn, fence)
        conn.execute(_CLOSE_PREDECESSORS, _fence_params(fence))
        row = conn.execute(_OPEN_SWEEP, _fence_params(fence)).fetchone()
        assert row is not None
        conn.execute(
            _PRUNE_SWEEPS, {"policy_key": fence.policy_key, "seconds": SWEEP_HISTORY_SECONDS}
        )
    return int(row[0])


def check_fence(conn: psycopg.Connection[Any], fence: sharding.Fence) -> None:
    """Inside a claim transaction: hold the owner row (shared) until the commit, or raise
    ``FencedOut`` — a takeover then waits for this transaction, or this one sees it."""
    if conn.execute(_CHECK_OWNER, _fence_params(fence)).fetchone() is None:
        raise _fenced_out(conn, fence)


def end_sweep(
    conn: psycopg.Connection[Any], fence: sharding.Fence, *, sweep_id: int, finished: bool
) -> None:
    """Close the interval, if this replica still owns the policy (else a takeover closed it)."""
    with conn.transaction():
        if conn.execute(_CHECK_OWNER, _fence_params(fence)).fetchone() is None:
            return
        conn.execute(_CLOSE_SWEEP, {"id": sweep_id, "ended": "finished" if finished else "failed"})


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
).format(policies=_POLICIES)


def upsert_policy(conn: psycopg.Connection[Any], policy: policy_module.Policy) -> None:
    """Publish the policy's retry and lease rules to workers (a no-op write when unchanged)."""
    conn.execute(
        _UPSERT_POLICY,
        {
            "policy_key": policy.key,
            "max_attempts": policy.retry.max_attempts,
            "initial": policy.retry.initial_delay_seconds,
            "factor": policy.retry.backoff_factor,
            "max_delay": policy.retry.max_delay_seconds,
            "jitter": policy.retry.jitter,
            "lease": policy.lease.timeout_seconds,
            "task_name": policy.task.name,
            "queue": policy.task.queue,
        },
    )


# An attempt's history row is written once, when the attempt ends (succeeded, failed or
# lost), from the entry row the ending statement just updated: the worker's fence check is
# then a single-row UPDATE, the least a per-task statement can be, and a running attempt is
# read from the entry row itself (``history``). A ledger of the previous schema may still
# hold ``running`` history rows: those are completed in place instead of inserted.
# ``ended`` names a CTE returning the entry's ``policy_key, entry_id, attempt, fence_token,
# worker, dispatched_at, started_at, incarnation``; the expressions may use its columns
# through the alias ``ended``.
def _attempt_ended(
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
        attempts=_ATTEMPTS,
        outcome=sql.Literal(outcome),
        error=sql.SQL(error),
        retry_at=sql.SQL(retry_at),
    )


# A lost running attempt is a failed attempt (the worker died or the body overran), so it
# consumes the attempt: a poison entry that kills its worker ends dead, not in a crash loop.
# An attempt is lost when the incarnation running it has ended (a pod event proved its
# container dead, or it stopped heartbeating and so stopped its own bodies), or — the backstop
# for workers of the previous schema, which have no incarnation — when its lease ran out.
_EXPIRE_LOST = sql.SQL(
    """
    WITH lost AS (
        UPDATE {entries} e SET
            state = CASE WHEN e.attempt >= p.max_attempts THEN 'dead' ELSE 'retry_wait' END,
            next_attempt_at = CASE WHEN e.attempt >= p.max_attempts THEN NULL ELSE now() END,
            last_error = coalesce(
                (SELECT 'the worker process running this attempt ended (' || i.ended_reason
                        || ')'
                 FROM {incarnations} i WHERE i.id = e.incarnation AND i.ended_at IS NOT NULL),
                'lease expired while running (the worker died, was restarted, or the body ran '
                || 'past spec.lease.timeout without heartbeats)')
                || ' on worker ' || coalesce(e.worker, 'an unknown worker'),
            lease_deadline = NULL,
            finished_at = now(),
            updated_at = now()
        FROM {policies} p
        WHERE p.policy_key = e.policy_key
          AND e.policy_key = %(policy_key)s
          AND e.state = 'running'
          AND (e.lease_deadline <= now()
               OR EXISTS (SELECT 1 FROM {incarnations} i
                          WHERE i.id = e.incarnation AND i.ended_at IS NOT NULL))
        RETURNING e.policy_key, e.entry_id, e.attempt, e.fence_token, e.worker,
            e.dispatched_at, e.started_at, e.incarnation, e.state, e.last_error
    ), {history}
    SELECT entry_id, state FROM lost
    """
).format(
    entries=_ENTRIES,
    policies=_POLICIES,
    incarnations=_INCARNATIONS,
    history=_attempt_ended(
        "lost",
        outcome="lost",
        error="ended.last_error",
        retry_at="CASE WHEN ended.state = 'dead' THEN NULL ELSE now() END",
    ),
)
_COUNT_UNSTARTED_EXPIRED = sql.SQL(
    "SELECT count(*) FROM {entries} WHERE policy_key = %s AND state = 'queued' "
    "AND lease_deadline <= now()"
).format(entries=_ENTRIES)


def expire_leases(conn: psycopg.Connection[Any], *, policy_key: str) -> ExpiredLeases:
    """Turn lost running attempts into failed ones; count lost messages.

    Lost: the incarnation running it has ended, or (backstop) its lease ran out. Queued rows
    whose lease ran out need no write: they are eligible for the next claim as they are (their
    message was lost, so no attempt is charged).
    """
    with conn.transaction():
        lost = conn.execute(_EXPIRE_LOST, {"policy_key": policy_key}).fetchall()
        unstarted = conn.execute(_COUNT_UNSTARTED_EXPIRED, [policy_key]).fetchone()
    assert unstarted is not None
    retry_ids = tuple(entry_id for entry_id, state in lost if state == "retry_wait")
    return ExpiredLeases(
        retry_now=len(retry_ids),
        dead=len(lost) - len(retry_ids),
        unstarted=unstarted[0],
        retry_ids=retry_ids,
    )


_END_SILENT_INCARNATIONS = sql.SQL(
    """
    UPDATE {incarnations} SET ended_at = now(),
        ended_reason = 'no heartbeat for ' || round(heartbeat_timeout_seconds::numeric, 1)
            || ' s: it stopped its own bodies'
    WHERE ended_at IS NULL
      AND heartbeat_at < now() - make_interval(secs => heartbeat_timeout_seconds)
    """
).format(incarnations=_INCARNATIONS)
# Ended incarnations are kept a day for ``explain`` and people, then pruned in batches.
_PRUNE_ENDED_INCARNATIONS = sql.SQL(
    """
    DELETE FROM {incarnations} WHERE id IN (
        SELECT id FROM {incarnations} WHERE ended_at < now() - interval '1 day' LIMIT 1000)
    """
).format(incarnations=_INCARNATIONS)


def end_silent_incarnations(conn: psycopg.Connection[Any]) -> int:
    """End every incarnation whose heartbeat is older than its timeout; how many ended.

    Such a worker has, by its own rule, stopped its bodies at half the timeout (or it is
    dead), so the operator may hand its attempts to someone else.
    """
    ended = conn.execute(_END_SILENT_INCARNATIONS).rowcount
    conn.execute(_PRUNE_ENDED_INCARNATIONS)
    return ended


_END_POD_INCARNATIONS = sql.SQL(
    """
    UPDATE {incarnations} SET ended_at = now(), ended_reason = %(reason)s
    WHERE ended_at IS NULL AND pod_uid = %(pod_uid)s
      AND (%(whole_pod)s
           OR (container_id IS NOT NULL
               AND NOT (container_id = ANY(%(running_container_ids)s::text[])))
           OR (container_id IS NULL
               AND (container_name = ANY(%(restarted_containers)s::text[])
                    OR (container_name IS NULL AND %(single_container)s))
               AND (%(started_before)s::timestamptz IS NULL
                    OR started_at < %(started_before)s::timestamptz)))
    """
).format(incarnations=_INCARNATIONS)


def end_pod_incarnations(conn: psycopg.Connection[Any], *, ending: planning.PodEnding) -> int:
    """End exactly the incarnations a pod event killed (see ``planning.pod_ending``)."""
    return conn.execute(
        _END_POD_INCARNATIONS,
        {
            "reason": ending.reason,
            "pod_uid": ending.pod_uid,
            "whole_pod": ending.whole_pod,
            "running_container_ids": list(ending.running_container_ids),
            "restarted_containers": list(ending.restarted_containers),
            "single_container": ending.single_container,
            "started_before": ending.started_before,
        },
    ).rowcount


# One unique-key probe per candidate id, forced by LATERAL: a plain ``entry_id = ANY(...)``
# lets the planner scan every row of the policy when the ledger's statistics are stale
# (a fresh ledger filling up within one big sweep), which made each page cost O(ledger).
_LOCK_CLAIMABLE = sql.SQL(
    """
    SELECT e.ctid, e.entry_id, e.state, e.counted
    FROM unnest(%(entry_ids)s::text[]) AS candidate(entry_id)
    CROSS JOIN LATERAL (
        SELECT ctid, entry_id, state, counted FROM {entries}
        WHERE policy_key = %(policy_key)s
          AND entry_id = candidate.entry_id
          AND (state = 'succeeded'
               OR (state = 'queued' AND lease_deadline <= now())
               OR (state = 'retry_wait' AND next_attempt_at <= now()))
        FOR UPDATE SKIP LOCKED
    ) AS e
    """
).format(entries=_ENTRIES)

# The rows are locked by this transaction, so their ctids cannot change under us: a TID
# scan updates exactly them, whatever the planner believes about the table's size.
_CLAIM_LOCKED = sql.SQL(
    """
    UPDATE {entries} SET
        state = 'queued',
        fence_token = gen_random_uuid(),
        lease_deadline = now() + make_interval(secs => %(lease_seconds)s),
        next_attempt_at = NULL,
        dispatched_at = now(),
        attempt = CASE WHEN state = 'succeeded' THEN 0 ELSE attempt END,
        incarnation = NULL,
        counted = false,
        last_error = CASE WHEN state = 'succeeded' THEN NULL ELSE last_error END,
        updated_at = now()
    WHERE ctid = ANY(%(row_ids)s::tid[])
      AND policy_key = %(policy_key)s
      AND entry_id = ANY(%(entry_ids)s::text[])
    RETURNING entry_id, fence_token
    """
).format(entries=_ENTRIES)

_CLAIM_NEW = sql.SQL(
    """
    INSERT INTO {entries} (policy_key, entry_id, state, fence_token, lease_deadline,
        dispatched_at)
    SELECT %(policy_key)s, new_id, 'queued', gen_random_uuid(),
        now() + make_interval(secs => %(lease_seconds)s), now()
    FROM unnest(%(entry_ids)s::text[]) AS new_id
    ON CONFLICT (policy_key, entry_id) DO NOTHING
    RETURNING entry_id, fence_token
    """
).format(entries=_ENTRIES)


def claim(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    entry_ids: Sequence[str],
    lease_seconds: float,
    still_pending: Callable[[Sequence[str]], set[str]],
    sweeper: sharding.Fence | None = None,
) -> list[Claim]:
    """Claim the eligible ones of ``entry_ids`` (pending in the source) with fresh fences.

    Must run inside the caller's transaction; the caller commits, and only then publishes.
    With a ``sweeper`` (active-active replicas), only while the ledger names it the
    policy's owner (``check_fence``), else ``FencedOut``.

    Eligible: no ledger row yet; ``queued`` with an expired lease (message lost);
    ``retry_wait`` whose retry is due; ``succeeded`` while the source predicate holds again.
    Rows locked by someone else are skipped (``SKIP LOCKED``), never waited for.

    The ``succeeded`` case is re-checked against the source *after* the row lock is taken,
    through ``still_pending`` (a fresh statement, hence a fresh snapshot under READ
    COMMITTED): a worker commits the body's write before it records success, so once we hold
    the succeeded row, the body's write is visible and a just-finished entry is not mistaken
    for "pending again".
    """
    if not entry_ids:
        return []
    if sweeper is not None:
        check_fence(conn, sweeper)
    ids = list(entry_ids)
    locked = conn.execute(_LOCK_CLAIMABLE, {"policy_key": policy_key, "entry_ids": ids}).fetchall()
    row_ids = {entry_id: row_id for row_id, entry_id, _, _ in locked}
    tallied = {entry_id for _, entry_id, state, counted in locked if counted}
    reclaim = [entry_id for _, entry_id, state, _ in locked if state != "succeeded"]
    succeeded = [entry_id for _, entry_id, state, _ in locked if state == "succeeded"]
    if succeeded:
        pending_again = still_pending(succeeded)
        reclaim.extend(entry_id for entry_id in succeeded if entry_id in pending_again)
    claims: dict[str, Claim] = {}
    if reclaim:
        for entry_id, fence in conn.execute(
            _CLAIM_LOCKED,
            {
                "policy_key": policy_key,
                "entry_ids": reclaim,
                "row_ids": [row_ids[entry_id] for entry_id in reclaim],
                "lease_seconds": lease_seconds,
            },
        ):
            claims[entry_id] = Claim(entry_id, fence, again=True)
        untallied = sum(1 for entry_id in claims if entry_id in tallied)
        if untallied:  # pending again: no longer succeeded, so out of the tally
            conn.execute(_UNTALLY, {"policy_key": policy_key, "count": untallied})
    for entry_id, fence in conn.execute(
        _CLAIM_NEW, {"policy_key": policy_key, "entry_ids": ids, "lease_seconds": lease_seconds}
    ):
        claims[entry_id] = Claim(entry_id, fence)
    # Keep the source's keyset order, so dispatch order follows spec.source.orderBy.
    return [claims[entry_id] for entry_id in ids if entry_id in claims]


_UNTALLY = sql.SQL(
    "UPDATE {tallies} SET succeeded = succeeded - %(count)s WHERE policy_key = %(policy_key)s"
).format(tallies=_TALLIES)

_RELEASE_CLAIMS = sql.SQL(
    """
    UPDATE {entries} SET lease_deadline = now(), updated_at = now()
    WHERE fence_token = ANY(%s::uuid[]) AND state = 'queued'
    RETURNING entry_id
    """
).format(entries=_ENTRIES)


def release_claims(
    conn: psycopg.Connection[Any], *, fence_tokens: Sequence[uuid.UUID]
) -> list[str]:
    """Make queued entries eligible again at once, instead of after the lease: claims whose
    publish failed, or whose message is gone (a worker took it and died before starting it,
    or it was lost on the way). Returns their entry ids.

    Safe even if some of those messages did reach the broker: the next claim writes a new
    fence token, and a worker drops any delivery whose task id is not the current fence.
    """
    if not fence_tokens:
        return []
    return [row[0] for row in conn.execute(_RELEASE_CLAIMS, [list(fence_tokens)])]


_QUEUED_SINCE = sql.SQL(
    """
    SELECT fence_token::text FROM {entries}
    WHERE policy_key = %s AND state = 'queued' AND lease_deadline > now()
      AND dispatched_at < now() - make_interval(secs => %s)
    """
).format(entries=_ENTRIES)


def queued_since(conn: psycopg.Connection[Any], *, policy_key: str, seconds: float) -> list[str]:
    """Fence tokens of entries published more than ``seconds`` ago and not started yet."""
    return [row[0] for row in conn.execute(_QUEUED_SINCE, [policy_key, seconds])]


_RELEASE_QUEUED = sql.SQL(
    """
    UPDATE {entries} SET lease_deadline = now(), updated_at = now()
    WHERE policy_key = %s AND state = 'queued' AND lease_deadline > now()
    """
).format(entries=_ENTRIES)


def release_queued(conn: psycopg.Connection[Any], *, policy_key: str) -> int:
    """Make every queued (published, not started) entry eligible now: its message is gone.

    Used when the broker restarted without its queues. A message that did survive carries
    the old fence token and is dropped by the worker, so releasing is always safe.
    """
    return conn.execute(_RELEASE_QUEUED, [policy_key]).rowcount


_COUNT_IN_FLIGHT = sql.SQL(
    "SELECT count(*) FROM {entries} WHERE policy_key = %s AND state IN ('queued', 'running') "
    "AND lease_deadline > now()"
).format(entries=_ENTRIES)


def count_in_flight(conn: psycopg.Connection[Any], *, policy_key: str) -> int:
    """Entries dispatched or running under a live lease (what ``maxInFlight`` limits)."""
    row = conn.execute(_COUNT_IN_FLIGHT, [policy_key]).fetchone()
    assert row is not None
    return int(row[0])


# When the loop must look again: the earliest due retry, lease deadline, or the moment a
# running attempt's incarnation would be silent for longer than its heartbeat timeout.
_NEXT_DUE = sql.SQL(
    """
    min(CASE
        WHEN e.state = 'retry_wait' THEN e.next_attempt_at
        WHEN e.state = 'queued' THEN e.lease_deadline
        WHEN e.state = 'running' THEN least(e.lease_deadline,
            (SELECT i.heartbeat_at + make_interval(secs => i.heartbeat_timeout_seconds)
             FROM {incarnations} i WHERE i.id = e.incarnation))
    END)
    """
).format(incarnations=_INCARNATIONS)
_SECONDS_UNTIL_NEXT_DUE = sql.SQL(
    """
    SELECT EXTRACT(EPOCH FROM {next_due} - now())
    FROM {entries} e
    WHERE e.policy_key = %s AND e.state IN ('queued', 'running', 'retry_wait')
    """
).format(entries=_ENTRIES, next_due=_NEXT_DUE)


def seconds_until_next_due(conn: psycopg.Connection[Any], *, policy_key: str) -> float | None:
    """Time until the earliest retry falls due or lease runs out (None: nothing scheduled)."""
    row = conn.execute(_SECONDS_UNTIL_NEXT_DUE, [policy_key]).fetchone()
    return None if row is None or row[0] is None else float(row[0])


_UNSETTLED = sql.SQL(
    """
    SELECT entry_id FROM {entries}
    WHERE policy_key = %s AND state IN ('retry_wait', 'dead')
    ORDER BY updated_at LIMIT %s
    """
).format(entries=_ENTRIES)

_MARK_SETTLED = sql.SQL(
    """
    UPDATE {entries} SET state = 'succeeded', next_attempt_at = NULL, updated_at = now(),
        finished_at = coalesce(finished_at, now())
    WHERE policy_key = %s AND entry_id = ANY(%s) AND state IN ('retry_wait', 'dead')
    """
).format(entries=_ENTRIES)


def settle_finished(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    still_pending: Callable[[Sequence[str]], set[str]],
    limit: int = 10_000,
) -> int:
    """Mark ``retry_wait`` and ``dead`` rows succeeded when the source says the entry is
    processed.

    This happens when a body committed its work but the worker died (or lost its lease)
    before recording success: the entry is done, and counting it as retrying or dead-lettered
    would lie.
    """
    waiting = [row[0] for row in conn.execute(_UNSETTLED, [policy_key, limit])]
    if not waiting:
        return 0
    pending = still_pending(waiting)
    done = [entry_id for entry_id in waiting if entry_id not in pending]
    if not done:
        return 0
    return conn.execute(_MARK_SETTLED, [policy_key, done]).rowcount


_DUE_RETRIES = sql.SQL(
    """
    SELECT entry_id FROM {entries}
    WHERE policy_key = %s AND state = 'retry_wait' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT %s
    """
).format(entries=_ENTRIES)


def due_retries(conn: psycopg.Connection[Any], *, policy_key: str, limit: int) -> list[str]:
    """Entries whose retry is due, the longest-waiting first: dispatched ahead of the backlog."""
    if limit <= 0:
        return []
    return [row[0] for row in conn.execute(_DUE_RETRIES, [policy_key, limit])]


_RETRY_DEAD = sql.SQL(
    """
    WITH revived AS (
        UPDATE {entries} SET state = 'retry_wait', attempt = 0, next_attempt_at = now(),
            updated_at = now()
        WHERE policy_key = %(policy_key)s AND state = 'dead'
          AND (%(entry_ids)s::text[] IS NULL OR entry_id = ANY(%(entry_ids)s::text[]))
        RETURNING 1
    )
    SELECT count(*) FROM revived
    """
).format(entries=_ENTRIES)


def retry_dead(
    conn: psycopg.Connection[Any], *, policy_key: str, entry_ids: Sequence[str] | None = None
) -> int:
    """Give dead entries (all, or the given ids) a fresh set of attempts, due now."""
    row = conn.execute(
        _RETRY_DEAD,
        {"policy_key": policy_key, "entry_ids": None if entry_ids is None else list(entry_ids)},
    ).fetchone()
    assert row is not None
    return int(row[0])


# Unfinished rows only (the partial index ``entries_unfinished``), and the succeeded ones as
# the tally plus the successes not folded into it yet: the cost follows the backlog and the
# recent throughput, never the history.
_COUNTS = sql.SQL(
    """
    SELECT
        count(*) FILTER (WHERE e.state = 'queued'),
        count(*) FILTER (WHERE e.state = 'running'),
        count(*) FILTER (WHERE e.state = 'retry_wait'),
        coalesce((SELECT t.succeeded FROM {tallies} t WHERE t.policy_key = %(policy_key)s), 0)
            + (SELECT count(*) FROM {entries} u
               WHERE u.policy_key = %(policy_key)s AND u.state = 'succeeded' AND NOT u.counted),
        count(*) FILTER (WHERE e.state = 'dead'),
        EXTRACT(EPOCH FROM {next_due} - now())
    FROM {entries} e WHERE e.policy_key = %(policy_key)s AND e.state <> 'succeeded'
    """
).format(entries=_ENTRIES, tallies=_TALLIES, next_due=_NEXT_DUE)


def counts(conn: psycopg.Connection[Any], *, policy_key: str) -> LedgerCounts:
    """Per-state counts for ProcessingStatus (``pending`` comes from the source)."""
    row = conn.execute(_COUNTS, {"policy_key": policy_key}).fetchone()
    assert row is not None
    return LedgerCounts(
        queued=row[0],
        running=row[1],
        retrying=row[2],
        succeeded=row[3],
        dead=row[4],
        seconds_until_next_due=None if row[5] is None else float(row[5]),
    )


@dataclasses.dataclass(frozen=True)
class Consumption:
    """Whether workers take this policy's work: ``planning.workers_not_consuming``."""

    oldest_queued_seconds: float | None  # None: nothing published and waiting
    last_finished_seconds_ago: float | None  # None: no attempt ever finished


# Both halves use an index: entries_unfinished (policy_key, state) and attempts_finished
# (policy_key, finished_at), so the check costs the backlog, not the history.
_CONSUMPTION = sql.SQL(
    """
    SELECT
        (SELECT EXTRACT(EPOCH FROM now() - min(dispatched_at)) FROM {entries}
         WHERE policy_key = %(policy_key)s AND state = 'queued' AND lease_deadline > now()),
        (SELECT EXTRACT(EPOCH FROM now() - max(finished_at)) FROM {attempts}
         WHERE policy_key = %(policy_key)s AND finished_at IS NOT NULL)
    """
).format(entries=_ENTRIES, attempts=_ATTEMPTS)


def consumption(conn: psycopg.Connection[Any], *, policy_key: str) -> Consumption:
    """How long the oldest published entry has waited for a worker, and how long ago any
    attempt of this policy last finished."""
    row = conn.execute(_CONSUMPTION, {"policy_key": policy_key}).fetchone()
    assert row is not None
    return Consumption(
        oldest_queued_seconds=None if row[0] is None else float(row[0]),
        last_finished_seconds_ago=None if row[1] is None else float(row[1]),
    )


FOLD_BATCH = 50_000
PRUNE_BATCH = 10_000

_FOLD_SUCCESSES = sql.SQL(
    """
    WITH folded AS (
        UPDATE {entries} SET counted = true
        WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {entries}
            WHERE policy_key = %(policy_key)s AND state = 'succeeded' AND NOT counted
            LIMIT %(limit)s))
          AND state = 'succeeded' AND NOT counted
        RETURNING 1
    )
    INSERT INTO {tallies} AS t (policy_key, succeeded)
    SELECT %(policy_key)s, count(*) FROM folded
    ON CONFLICT (policy_key) DO UPDATE SET succeeded = t.succeeded + EXCLUDED.succeeded
    RETURNING (SELECT count(*) FROM folded)
    """
).format(entries=_ENTRIES, tallies=_TALLIES)


def fold_successes(
    conn: psycopg.Connection[Any], *, policy_key: str, limit: int = FOLD_BATCH
) -> int:
    """Add successes not yet counted to the policy's tally (at most ``limit``); how many.

    A row's ``counted`` flag and the tally change in one statement, so each success is
    counted exactly once, whenever its transaction committed — no time watermark to race.
    """
    row = conn.execute(_FOLD_SUCCESSES, {"policy_key": policy_key, "limit": limit}).fetchone()
    return 0 if row is None else int(row[0])


# Oldest first, a bounded batch per sweep, each through its index: retention costs what it
# deletes, however large the history. Only counted successes go: the tally keeps them.
_PRUNE_ATTEMPTS = sql.SQL(
    """
    DELETE FROM {attempts} WHERE id = ANY(ARRAY(
        SELECT id FROM {attempts}
        WHERE policy_key = %(policy_key)s AND finished_at IS NOT NULL
          AND finished_at < now() - make_interval(secs => %(retention)s)
        ORDER BY finished_at LIMIT %(limit)s))
    """
).format(attempts=_ATTEMPTS)
_PRUNE_SUCCEEDED = sql.SQL(
    """
    DELETE FROM {entries} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {entries}
        WHERE policy_key = %(policy_key)s AND state = 'succeeded' AND counted
          AND finished_at < now() - make_interval(secs => %(retention)s)
        ORDER BY finished_at LIMIT %(limit)s))
      AND state = 'succeeded' AND counted
    """
).format(entries=_ENTRIES)


@dataclasses.dataclass(frozen=True)
class Pruned:
    attempts: int
    entries: int


def prune(
    conn: psycopg.Connection[Any],
    *,
    policy_key: str,
    retention_seconds: float,
    limit: int = PRUNE_BATCH,
) -> Pruned:
    """Delete up to ``limit`` attempts and ``limit`` succeeded entries that finished more than
    ``retention_seconds`` ago. Dropping a succeeded row loses nothing: an entry the source
    shows pending again is simply claimed anew."""
    params = {"policy_key": policy_key, "retention": retention_seconds, "limit": limit}
    attempts = conn.execute(_PRUNE_ATTEMPTS, params).rowcount
    entries = conn.execute(_PRUNE_SUCCEEDED, params).rowcount
    return Pruned(attempts=attempts, entries=entries)


_ENTRY = sql.SQL(
    """
    SELECT policy_key, entry_id, state, attempt, fence_token, lease_deadline, next_attempt_at,
        worker, last_error, created_at, updated_at
    FROM {entries} WHERE policy_key = %s AND entry_id = %s
    """
).format(entries=_ENTRIES)
# Ended attempts, then the running one, which has no history row yet (``_attempt_ended``).
_ATTEMPT_HISTORY = sql.SQL(
    """
    SELECT attempt, fence_token, worker, outcome, error, dispatched_at, started_at,
        finished_at, retry_at
    FROM (
        SELECT id, attempt, fence_token, worker, outcome, error, dispatched_at, started_at,
            finished_at, retry_at
        FROM {attempts} WHERE policy_key = %(policy_key)s AND entry_id = %(entry_id)s
        UNION ALL
        SELECT NULL, e.attempt, e.fence_token, e.worker, 'running', NULL, e.dispatched_at,
            e.started_at, NULL, NULL
        FROM {entries} e
        WHERE e.policy_key = %(policy_key)s AND e.entry_id = %(entry_id)s
          AND e.state = 'running'
          AND NOT EXISTS (SELECT 1 FROM {attempts} a
                          WHERE a.fence_token = e.fence_token AND a.outcome = 'running')
    ) AS attempts
    ORDER BY id NULLS LAST
    """
).format(attempts=_ATTEMPTS, entries=_ENTRIES)


def history(
    conn: psycopg.Connection[Any], *, policy_key: str, entry_id: str
) -> EntryHistory | None:
    """The ledger row of one entry and every attempt it had (for ``explain``)."""
    with conn.cursor(row_factory=dict_row) as cursor:
        entry = cursor.execute(_ENTRY, [policy_key, entry_id]).fetchone()
        if entry is None:
            return None
        attempts = cursor.execute(
            _ATTEMPT_HISTORY, {"policy_key": policy_key, "entry_id": entry_id}
        ).fetchall()
    return EntryHistory(**entry, attempts=tuple(AttemptRecord(**attempt) for attempt in attempts))


# --- worker side ---------------------------------------------------------------------------

# Bodies an incarnation finished, marked succeeded in one batch by its next heartbeat (or by
# ``record_success`` inside a fenced commit): a worker spends a single one-row statement per
# task, its fence check. Until the mark the entry stays ``running`` under a live incarnation —
# nothing re-dispatches it — and if the process dies first, the source shows it processed
# and the sweep settles it. Every statement that embeds this binds ``%(finished)s`` (a uuid[]).
_MARK_FINISHED = sql.SQL(
    """
    finished AS (
        UPDATE {entries} SET state = 'succeeded', lease_deadline = NULL,
            next_attempt_at = NULL, finished_at = now(), updated_at = now()
        WHERE fence_token = ANY(%(finished)s::uuid[]) AND state = 'running'
        RETURNING policy_key, entry_id, attempt, fence_token, worker, dispatched_at,
            started_at, incarnation
    ), {history}
    """
).format(entries=_ENTRIES, history=_attempt_ended("finished", outcome="succeeded"))


# The fence: a worker may run the body only if its task id is the entry's current fence
# token, the entry is still queued (not already running, retried or finished) and the lease
# is live — and, for a worker with an incarnation, only while that incarnation is live and
# heartbeated within half its timeout. One single-row UPDATE checks and claims at once, so two
# deliveries cannot both pass. ``FOR SHARE`` on the incarnation row makes the operator's
# ending of it (an UPDATE of that row) and this start serialize: whichever commits first
# wins, and a start that waited re-reads the row and sees it ended. The lease is never
# shorter than the heartbeat timeout, so the backstop cannot fire between two renewals.
_START_ATTEMPT = sql.SQL(
    """
    UPDATE {entries} e SET
        state = 'running',
        attempt = e.attempt + 1,
        worker = %(worker)s,
        incarnation = %(incarnation)s::uuid,
        started_at = now(),
        finished_at = NULL,
        lease_deadline = now() + make_interval(secs => greatest(
            (SELECT p.lease_seconds FROM {policies} p WHERE p.policy_key = e.policy_key),
            coalesce(%(heartbeat_timeout)s::float8, 0))),
        updated_at = now()
    WHERE e.fence_token = %(fence_token)s
      AND (%(entry_id)s::text IS NULL OR e.entry_id = %(entry_id)s::text)
      AND e.state = 'queued'
      AND e.lease_deadline > now()
      AND (%(incarnation)s::uuid IS NULL OR EXISTS (
            SELECT 1 FROM {incarnations} i
            WHERE i.id = %(incarnation)s::uuid AND i.ended_at IS NULL
              AND i.heartbeat_at > now() - make_interval(secs => i.heartbeat_timeout_seconds / 2)
            FOR SHARE))
    RETURNING e.policy_key, e.entry_id, e.attempt, e.fence_token
    """
).format(entries=_ENTRIES, policies=_POLICIES, incarnations=_INCARNATIONS)


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
            "heartbeat_timeout": heartbeat_timeout_seconds,
        },
    ).fetchone()
    if row is None:
        return None
    policy_key, entry, attempt, fence = row
    return RunningAttempt(policy_key=policy_key, entry_id=entry, attempt=attempt, fence_token=fence)


_RETRY_RULES = sql.SQL(
    """
    SELECT max_attempts, initial_delay_seconds, backoff_factor, max_delay_seconds, jitter
    FROM {policies} WHERE policy_key = %s
    """
).format(policies=_POLICIES)


def retry_rules(conn: psycopg.Connection[Any], *, policy_key: str) -> policy_module.Retry:
    """The policy's retry rules as the operator last wrote them (read when a body fails)."""
    row = conn.execute(_RETRY_RULES, [policy_key]).fetchone()
    if row is None:
        # The policy was deleted while its body ran: one attempt, no retry.
        return policy_module.Retry(
            max_attempts=1,
            initial_delay_seconds=0.0,
            backoff_factor=1.0,
            max_delay_seconds=0.0,
            jitter=False,
        )
    max_attempts, initial, factor, max_delay, jitter = row
    return policy_module.Retry(
        max_attempts=max_attempts,
        initial_delay_seconds=initial,
        backoff_factor=factor,
        max_delay_seconds=max_delay,
        jitter=jitter,
    )


_RECORD_SUCCESS = sql.SQL("WITH {mark_finished} SELECT count(*) FROM finished").format(
    mark_finished=_MARK_FINISHED
)


def record_success(conn: psycopg.Connection[Any], *, fence_token: uuid.UUID) -> bool:
    """Mark the attempt succeeded; ``False`` if it no longer owned the entry (lease lost)."""
    row = conn.execute(_RECORD_SUCCESS, {"finished": [fence_token]}).fetchone()
    return bool(row and row[0])


_RECORD_FAILURE = sql.SQL(
    """
    WITH failed AS (
        UPDATE {entries} SET
            state = CASE WHEN %(retry_in_seconds)s::float8 IS NULL THEN 'dead'
                         ELSE 'retry_wait' END,
            next_attempt_at = now() + make_interval(secs => %(retry_in_seconds)s::float8),
            last_error = %(error)s,
            lease_deadline = NULL,
            finished_at = now(),
            updated_at = now()
        WHERE fence_token = %(fence_token)s AND state = 'running'
        RETURNING policy_key, entry_id, attempt, fence_token, worker, dispatched_at,
            started_at, incarnation, state, next_attempt_at
    ), {history}
    SELECT state FROM failed
    """
).format(
    entries=_ENTRIES,
    history=_attempt_ended(
        "failed", outcome="failed", error="%(error)s", retry_at="ended.next_attempt_at"
    ),
)


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
    return None if row is None else str(row[0])


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


_REGISTER_INCARNATION = sql.SQL(
    """
    INSERT INTO {incarnations} (id, hostname, pid, pod_name, pod_namespace, pod_uid,
        container_id, container_name, heartbeat_timeout_seconds)
    VALUES (%(id)s, %(hostname)s, %(pid)s, %(pod_name)s, %(pod_namespace)s, %(pod_uid)s,
        %(container_id)s, %(container_name)s, %(timeout)s)
    """
).format(incarnations=_INCARNATIONS)


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
            "timeout": heartbeat_timeout_seconds,
            **dataclasses.asdict(identity),
        },
    )
    return incarnation


# One statement per incarnation per interval, however many bodies it runs: renew the
# incarnation and push the lease of each attempt it runs, so a long body never outlives it.
# Attempts whose body finished but whose outcome could not be recorded (the database was
# away) are not renewed but released: their lease ends now, and the next sweep settles them
# from the table or re-dispatches them. The lease is never shorter than the incarnation's
# heartbeat timeout, so the backstop cannot fire between the renewals of a live worker.
_HEARTBEAT = sql.SQL(
    """
    WITH {mark_finished}, me AS (
        UPDATE {incarnations} SET heartbeat_at = now()
        WHERE id = %(incarnation)s AND ended_at IS NULL
        RETURNING id, heartbeat_timeout_seconds
    ), renewed AS (
        UPDATE {entries} e SET lease_deadline = CASE
            WHEN e.fence_token = ANY(%(unrecorded)s::uuid[]) THEN now()
            ELSE now() + make_interval(
                secs => greatest(p.lease_seconds, me.heartbeat_timeout_seconds))
        END
        FROM {policies} p, me
        WHERE e.incarnation = me.id AND e.state = 'running' AND p.policy_key = e.policy_key
          AND NOT e.fence_token = ANY(%(finished)s::uuid[])
    )
    SELECT count(*) FROM me
    """
).format(
    incarnations=_INCARNATIONS,
    entries=_ENTRIES,
    policies=_POLICIES,
    mark_finished=_MARK_FINISHED,
)


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


_INCARNATION_IS_LIVE = sql.SQL(
    """
    SELECT ended_at IS NULL
        AND heartbeat_at > now() - make_interval(secs => heartbeat_timeout_seconds / 2)
    FROM {incarnations} WHERE id = %s
    """
).format(incarnations=_INCARNATIONS)


def incarnation_is_live(conn: psycopg.Connection[Any], *, incarnation: uuid.UUID) -> bool:
    """Whether ``start_attempt`` would accept this incarnation (not ended, heartbeat fresh)."""
    row = conn.execute(_INCARNATION_IS_LIVE, [incarnation]).fetchone()
    return bool(row and row[0])


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """Attempts that finished in a time window, by what became of their entry."""

    succeeded: int
    retried: int  # failed or lost, with another attempt scheduled
    dead_lettered: int  # failed or lost with no attempts left
    until: datetime.datetime  # the window's end: pass it as ``since`` next time


# A window ends a few seconds in the past: an attempt's finished_at is its transaction's
# start, so one committing right now may carry a time just before the window's end.
OUTCOME_SETTLE_SECONDS = 5.0

_OUTCOMES = sql.SQL(
    """
    WITH window_end AS (SELECT now() - make_interval(secs => %(settle)s) AS until)
    SELECT window_end.until,
        count(*) FILTER (WHERE outcome = 'succeeded'),
        count(*) FILTER (WHERE outcome IN ('failed', 'lost') AND retry_at IS NOT NULL),
        count(*) FILTER (WHERE outcome IN ('failed', 'lost') AND retry_at IS NULL)
    FROM window_end LEFT JOIN {attempts} a
      ON a.policy_key = %(policy_key)s
     AND a.finished_at > coalesce(%(since)s::timestamptz, '-infinity')
     AND a.finished_at <= window_end.until
    GROUP BY window_end.until
    """
).format(attempts=_ATTEMPTS)


def outcomes_since(
    conn: psycopg.Connection[Any], *, policy_key: str, since: datetime.datetime | None
) -> Outcomes:
    """Outcomes of attempts finished after ``since`` (all history when ``None``)."""
    row = conn.execute(
        _OUTCOMES,
        {"policy_key": policy_key, "since": since, "settle": OUTCOME_SETTLE_SECONDS},
    ).fetchone()
    assert row is not None
    return Outcomes(until=row[0], succeeded=row[1], retried=row[2], dead_lettered=row[3])
