"""The typed ProcessingPolicy: one parse of the user's ``spec`` into frozen dataclasses.

Everything downstream (planning, the ledger, the source reader, the broker, the kopf
handlers, the CLI) works on a ``Policy`` and never on the raw dict, so validation happens in
exactly one place and a bad spec is rejected before it can reach SQL or a broker.

Why a hand-written parser rather than a schema library: the errors are the product here. A
user who typed ``table: "journal; drop"`` must read ``spec.source.table: ... is not a SQL
identifier`` with the field path, and must see *every* problem of the spec at once, not the
first one. ``InvalidPolicy`` carries the full list.

Identifiers are only validated here (``^[A-Za-z_][A-Za-z0-9_]{0,62}$`` per part); they are
always quoted later with ``psycopg.sql.Identifier``, so MixedCase names work and nothing is
ever concatenated into SQL. The pending predicate is structured (``equals`` / ``in`` /
``isNull``), never raw SQL.

This module is pure: it imports no psycopg, celery, kopf or kubernetes (only the worker's
pure ``backoff``, which owns the ``Retry`` record), so the CLI and the unit tests can load it
anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from celery_reconciler_worker import backoff

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Celery accepts any string as a task or queue name; we accept the conventional subset so a
# name can never smuggle whitespace or control characters into logs or broker keys.
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,254}$")
QUEUE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$")
# The options of Celery's ``broker_transport_options`` that name the Redis keys kombu uses for
# a queue: the operator publishes onto those keys and reads them, so it must use the workers'
# names. The other options (visibility_timeout, ...) are the workers' business.
BROKER_KEY_OPTIONS = (
    "global_keyprefix",
    "unacked_key",
    "unacked_index_key",
    "sep",
    "priority_steps",
)
# A key name or prefix: printable, no whitespace (kombu's separator is the exception: its
# default is two control characters).
REDIS_KEY_NAME_PATTERN = re.compile(r"^[!-~]{1,200}$")
MAX_REDIS_SEPARATOR_LENGTH = 16
# Kubernetes label syntax (apimachinery's IsQualifiedName / IsValidLabelValue): a key is an
# optional DNS-subdomain prefix and "/", then a name of at most 63 characters; a value is at
# most 63 characters, alphanumeric at both ends, or empty. The CRD says the same, so a key
# that could smuggle ",", "!=" or "(" into a selector string is refused at apply time.
LABEL_NAME_PATTERN = re.compile(r"^(?:[A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
LABEL_PREFIX_PATTERN = re.compile(
    r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$"
)
LABEL_VALUE_PATTERN = re.compile(r"^(?:(?:[A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
MAX_LABEL_PREFIX_LENGTH = 253
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# [0-9], not \d: \d also matches other scripts' digits, which float() would then accept.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

DEFAULT_QUEUE = "celery"
DEFAULT_ID_COLUMN = "id"
DEFAULT_DATABASE_SECRET_KEY = "dsn"
DEFAULT_BROKER_SECRET_KEY = "url"
DEFAULT_SWEEP_INTERVAL = "5m"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_INITIAL_DELAY = "60s"
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_MAX_DELAY = "1h"
DEFAULT_LEASE_TIMEOUT = "15m"
# Ledger history (finished attempts, succeeded rows) is kept a week, then pruned.
DEFAULT_HISTORY_RETENTION = "168h"
MIN_HISTORY_RETENTION_SECONDS = 60.0
DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_IN_FLIGHT = 10_000
MAX_BATCH_SIZE = 50_000
MAX_ATTEMPTS_LIMIT = 1000
MIN_SWEEP_INTERVAL_SECONDS = 1.0
DEFAULT_START_TIMEOUT = "3m"
# Upper bounds that keep every sum of "now" and a user's duration or rate inside the range
# of a timestamp (Python's datetime and PostgreSQL's timestamptz): the CRD says the same.
MAX_SWEEP_INTERVAL_SECONDS = 24 * 3600.0
MAX_DELAY_SECONDS = 7 * 24 * 3600.0
MAX_LEASE_SECONDS = 7 * 24 * 3600.0
MAX_START_TIMEOUT_SECONDS = 24 * 3600.0
MAX_HISTORY_RETENTION_SECONDS = 87600 * 3600.0  # ten years
MAX_BACKOFF_FACTOR = 100.0
MAX_MAX_IN_FLIGHT = 10_000_000
MIN_DISPATCH_PER_SECOND = 0.01
MAX_DISPATCH_PER_SECOND = 1_000_000.0


class InvalidDuration(ValueError):
    """A duration string is not Go-style (``90s``, ``5m``, ``1h30m``, ``250ms``)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, located by its field path (``spec.retry.maxAttempts``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidPolicy(ValueError):
    """The spec cannot be used; ``problems`` lists every field that is wrong, not just one."""

    def __init__(self, policy_key: str, problems: Sequence[Problem]) -> None:
        self.policy_key = policy_key
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"ProcessingPolicy {policy_key} is invalid ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}); fix these fields:\n{lines}"
        )


@dataclasses.dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class TableName:
    """A table, optionally schema-qualified; each part a validated identifier."""

    schema: str | None
    table: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table


@dataclasses.dataclass(frozen=True)
class PendingEquals:
    """``column = value``: a boolean flag (``insights_extracted = false``) or a status value."""

    column: str
    value: bool | int | str


@dataclasses.dataclass(frozen=True)
class PendingIn:
    """``column IN (values)``: a status column within a set (``status in [new, failed]``)."""

    column: str
    values: tuple[str, ...] | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PendingIsNull:
    """``column IS NULL`` (``is_null``) or ``IS NOT NULL``: e.g. ``processed_at IS NULL``."""

    column: str
    is_null: bool


PendingPredicate = PendingEquals | PendingIn | PendingIsNull


@dataclasses.dataclass(frozen=True)
class Source:
    database_secret: SecretRef | None
    table: TableName
    id_column: str
    pending: PendingPredicate
    order_by: str

    @property
    def orders_by_id(self) -> bool:
        return self.order_by == self.id_column


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    broker_secret: SecretRef | None
    queue: str
    # (option, value) pairs of BROKER_KEY_OPTIONS the app sets; kombu's defaults for the rest.
    broker_transport_options: tuple[tuple[str, str | tuple[int, ...]], ...] = ()

    def transport_options(self) -> dict[str, str | list[int]]:
        """The options as Celery's ``broker_transport_options`` spells them."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in self.broker_transport_options
        }


@dataclasses.dataclass(frozen=True)
class Schedule:
    sweep_interval_seconds: float
    suspend: bool


# Workers read the retry rules back from the ledger, so the record is the worker package's.
Retry = backoff.Retry


@dataclasses.dataclass(frozen=True)
class Lease:
    timeout_seconds: float


@dataclasses.dataclass(frozen=True)
class History:
    retention_seconds: float


@dataclasses.dataclass(frozen=True)
class LabelSelectorRequirement:
    key: str
    operator: str
    values: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Workers:
    """Which pods run the task; their restarts orphan the leases they held."""

    match_labels: tuple[tuple[str, str], ...]
    match_expressions: tuple[LabelSelectorRequirement, ...]
    # How long a dispatched entry may wait for a worker to start it before the policy
    # reports WorkersNotConsuming (nobody consumes its queue, or workers cannot start it).
    start_timeout_seconds: float = 180.0


@dataclasses.dataclass(frozen=True)
class Limits:
    batch_size: int
    max_in_flight: int
    dispatch_per_second: float  # 0 means unlimited


@dataclasses.dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    source: Source
    task: Task
    schedule: Schedule
    retry: Retry
    lease: Lease
    history: History
    workers: Workers
    limits: Limits

    @property
    def key(self) -> str:
        """The policy's key in the ledger: ``"<namespace>/<name>"``."""
        return f"{self.namespace}/{self.name}"


def parse_duration_seconds(text: str) -> float:
    """Parse a Go-style duration (``90s``, ``5m``, ``1h30m``, ``250ms``, ``-5m``) to seconds.

    Negative durations parse (so the caller can say "must be positive" rather than "bad
    syntax"); a bare number without a unit is rejected because ``300`` is ambiguous.
    """
    if not isinstance(text, str):
        raise InvalidDuration(f'{text!r} is not a duration string; write e.g. "90s" or "5m"')
    body = text.strip()
    sign = 1.0
    if body and body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    position = 0
    total = 0.0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if match is None:
            break
        total += float(match.group(1)) * _DURATION_UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise InvalidDuration(
            f"{text!r} is not a duration; write a number with a unit (ns, us, ms, s, m, h), "
            'e.g. "90s", "5m", "1h30m" or "250ms"'
        )
    return sign * total


def is_label_key(key: object) -> bool:
    """A Kubernetes qualified name: ``[prefix/]name`` (``app``, ``app.kubernetes.io/name``)."""
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    if slash and (
        not prefix
        or len(prefix) > MAX_LABEL_PREFIX_LENGTH
        or not LABEL_PREFIX_PATTERN.fullmatch(prefix)
    ):
        return False
    return bool(LABEL_NAME_PATTERN.fullmatch(name))


def is_label_value(value: object) -> bool:
    """A Kubernetes label value: at most 63 characters, alphanumeric at both ends, or empty."""
    return isinstance(value, str) and bool(LABEL_VALUE_PATTERN.fullmatch(value))


def parse_policy(
    spec: Mapping[str, Any],
    *,
    namespace: str,
    name: str,
    require_secret_refs: bool = True,
) -> Policy:
    """Validate ``spec`` and build a ``Policy``, or raise ``InvalidPolicy`` listing every problem.

    ``require_secret_refs=False`` is for the CLI, where the DSN and broker URL come from
    flags or the environment instead of Kubernetes Secrets.
    """
    parser = _Parser()
    policy = parser.policy(
        spec, namespace=namespace, name=name, require_secrets=require_secret_refs
    )
    if parser.problems or policy is None:
        raise InvalidPolicy(f"{namespace}/{name}", parser.problems)
    return policy


class _Parser:
    """Collects problems instead of stopping at the first one."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    # --- generic field readers: each returns a usable fallback after recording a problem

    def mapping(self, value: Any, path: str, *, allowed: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(path, f"must be an object, got {_describe(value)}")
            return {}
        for key in value:
            if key not in allowed:
                self.problem(
                    f"{path}.{key}", f"unknown field; known fields are {', '.join(allowed)}"
                )
        return value

    def identifier(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not IDENTIFIER_PATTERN.fullmatch(value):
            self.problem(
                path,
                f"{_describe(value)} is not a SQL identifier; use letters, digits and "
                "underscores, starting with a letter or underscore, at most 63 characters",
            )
            return "invalid"
        return value

    def duration(self, value: Any, path: str, *, maximum_seconds: float) -> float:
        try:
            seconds = parse_duration_seconds(value)
        except InvalidDuration as error:
            self.problem(path, str(error))
            return 1.0
        if seconds <= 0:
            self.problem(path, f"{value!r} must be positive")
            return 1.0
        if seconds > maximum_seconds:
            self.problem(path, f"{value!r} is longer than the maximum {_hours(maximum_seconds)}")
            return maximum_seconds
        return seconds

    def integer(self, value: Any, path: str, *, minimum: int, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(path, f"must be an integer, got {_describe(value)}")
            return minimum
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.problem(path, f"{value} is out of range; it must be {bound}")
            return minimum
        return value

    def number(self, value: Any, path: str, *, minimum: float, maximum: float) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.problem(path, f"must be a number, got {_describe(value)}")
            return minimum
        if not minimum <= value <= maximum:
            self.problem(
                path, f"{value} is out of range; it must be between {minimum:g} and {maximum:g}"
            )
            return minimum
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.problem(path, f"must be true or false, got {_describe(value)}")
            return False
        return value

    def secret_ref(
        self, value: Any, path: str, *, default_key: str, required: bool
    ) -> SecretRef | None:
        if value is None:
            if required:
                self.problem(path, f"is required: {{name: <secret>, key: {default_key}}}")
            return None
        ref = self.mapping(value, path, allowed=("name", "key"))
        secret_name = ref.get("name")
        if not isinstance(secret_name, str) or not secret_name:
            self.problem(f"{path}.name", "is required: the name of a Secret in this namespace")
            secret_name = "invalid"
        key = ref.get("key", default_key)
        if not isinstance(key, str) or not key:
            self.problem(f"{path}.key", f"must be a non-empty string, got {_describe(key)}")
            key = default_key
        return SecretRef(name=secret_name, key=key)

    # --- the spec's sections

    def policy(
        self, spec: Any, *, namespace: str, name: str, require_secrets: bool
    ) -> Policy | None:
        if not namespace or not name:
            self.problem("metadata", "namespace and name are required")
        if not isinstance(spec, Mapping):
            self.problem("spec", f"must be an object, got {_describe(spec)}")
            return None
        top = self.mapping(
            spec,
            "spec",
            allowed=(
                "source",
                "task",
                "schedule",
                "retry",
                "lease",
                "workers",
                "limits",
                "history",
            ),
        )
        if "source" not in top:
            self.problem("spec.source", "is required")
        if "task" not in top:
            self.problem("spec.task", "is required")
        source = self.source(top.get("source"), require_secrets=require_secrets)
        task = self.task(top.get("task"), require_secrets=require_secrets)
        schedule = self.schedule(top.get("schedule"))
        retry = self.retry(top.get("retry"))
        lease = self.lease(top.get("lease"))
        history = self.history(top.get("history"))
        workers = self.workers(top.get("workers"))
        limits = self.limits(top.get("limits"))
        return Policy(
            namespace=namespace,
            name=name,
            source=source,
            task=task,
            schedule=schedule,
            retry=retry,
            lease=lease,
            history=history,
            workers=workers,
            limits=limits,
        )

    def source(self, value: Any, *, require_secrets: bool) -> Source:
        path = "spec.source"
        raw = self.mapping(
            value,
            path,
            allowed=("databaseSecretRef", "table", "idColumn", "pending", "orderBy"),
        )
        secret = self.secret_ref(
            raw.get("databaseSecretRef"),
            f"{path}.databaseSecretRef",
            default_key=DEFAULT_DATABASE_SECRET_KEY,
            required=require_secrets,
        )
        table = self.table(raw.get("table"), f"{path}.table")
        id_column = self.identifier(raw.get("idColumn", DEFAULT_ID_COLUMN), f"{path}.idColumn")
        pending = self.pending(raw.get("pending"), f"{path}.pending")
        order_by = raw.get("orderBy")
        order_column = (
            id_column if order_by is None else self.identifier(order_by, f"{path}.orderBy")
        )
        return Source(
            database_secret=secret,
            table=table,
            id_column=id_column,
            pending=pending,
            order_by=order_column,
        )

    def table(self, value: Any, path: str) -> TableName:
        if not isinstance(value, str) or not value:
            self.problem(path, 'is required: "table" or "schema.table"')
            return TableName(schema=None, table="invalid")
        parts = value.split(".")
        if len(parts) > 2 or not all(IDENTIFIER_PATTERN.fullmatch(part) for part in parts):
            self.problem(
                path,
                f'{value!r} is not a SQL identifier: write "table" or "schema.table", each '
                "part letters, digits and underscores, starting with a letter or underscore, "
                "at most 63 characters",
            )
            return TableName(schema=None, table="invalid")
        if len(parts) == 2:
            return TableName(schema=parts[0], table=parts[1])
        return TableName(schema=None, table=parts[0])

    def pending(self, value: Any, path: str) -> PendingPredicate:
        fallback = PendingIsNull(column="invalid", is_null=True)
        if value is None:
            self.problem(path, "is required: {column: <name>, equals: <value>} (or in / isNull)")
            return fallback
        raw = self.mapping(value, path, allowed=("column", "equals", "in", "isNull"))
        if not raw:
            return fallback
        column = self.identifier(raw.get("column"), f"{path}.column")
        given = [key for key in ("equals", "in", "isNull") if key in raw]
        if len(given) != 1:
            self.problem(
                path,
                "needs exactly one of equals, in or isNull"
                + (f" (got {', '.join(given)})" if given else ""),
            )
            return fallback
        match given[0]:
            case "equals":
                equals = raw["equals"]
                if not isinstance(equals, bool | int | str) or (
                    isinstance(equals, str) and not equals
                ):
                    self.problem(
                        f"{path}.equals",
                        f"must be a boolean, an integer or a non-empty string, got "
                        f"{_describe(equals)}",
                    )
                    return fallback
                return PendingEquals(column=column, value=equals)
            case "in":
                return self.pending_in(raw["in"], f"{path}.in", column=column) or fallback
            case _:
                return PendingIsNull(
                    column=column, is_null=self.boolean(raw["isNull"], f"{path}.isNull")
                )

    def pending_in(self, value: Any, path: str, *, column: str) -> PendingIn | None:
        if not isinstance(value, list) or not value:
            self.problem(path, f"must be a non-empty list of values, got {_describe(value)}")
            return None
        if all(isinstance(item, str) and item for item in value):
            return PendingIn(column=column, values=tuple(str(item) for item in value))
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return PendingIn(column=column, values=tuple(int(item) for item in value))
        self.problem(path, "must hold only non-empty strings or only integers")
        return None

    def task(self, value: Any, *, require_secrets: bool) -> Task:
        path = "spec.task"
        raw = self.mapping(
            value, path, allowed=("name", "brokerSecretRef", "queue", "brokerTransportOptions")
        )
        task_name = raw.get("name")
        if not isinstance(task_name, str) or not TASK_NAME_PATTERN.fullmatch(task_name):
            self.problem(
                f"{path}.name",
                f"{_describe(task_name)} is not a Celery task name; it is required, e.g. "
                "insights.tasks.extract_insights_task (letters, digits, _ . : -)",
            )
            task_name = "invalid"
        secret = self.secret_ref(
            raw.get("brokerSecretRef"),
            f"{path}.brokerSecretRef",
            default_key=DEFAULT_BROKER_SECRET_KEY,
            required=require_secrets,
        )
        queue = raw.get("queue", DEFAULT_QUEUE)
        if not isinstance(queue, str) or not QUEUE_NAME_PATTERN.fullmatch(queue):
            self.problem(
                f"{path}.queue",
                f"{_describe(queue)} is not a queue name (letters, digits, _ . : -)",
            )
            queue = DEFAULT_QUEUE
        return Task(
            name=task_name,
            broker_secret=secret,
            queue=queue,
            broker_transport_options=self.broker_transport_options(
                raw.get("brokerTransportOptions"), f"{path}.brokerTransportOptions"
            ),
        )

    def broker_transport_options(
        self, value: Any, path: str
    ) -> tuple[tuple[str, str | tuple[int, ...]], ...]:
        raw = self.mapping(value, path, allowed=BROKER_KEY_OPTIONS)
        options: list[tuple[str, str | tuple[int, ...]]] = []
        for name in BROKER_KEY_OPTIONS:
            if name not in raw:
                continue
            item = raw[name]
            if name == "priority_steps":
                if (
                    isinstance(item, list)
                    and item
                    and all(isinstance(s, int) and not isinstance(s, bool) for s in item)
                    and item[0] == 0
                    and item == sorted(set(item))
                    and item[-1] <= 255
                ):
                    options.append((name, tuple(item)))
                else:
                    self.problem(
                        f"{path}.{name}",
                        f"{_describe(item)} is not kombu's priority steps: ascending integers "
                        "from 0 to 255, the first 0 (kombu's default is [0, 3, 6, 9])",
                    )
            elif name == "sep":
                if isinstance(item, str) and 0 < len(item) <= MAX_REDIS_SEPARATOR_LENGTH:
                    options.append((name, item))
                else:
                    self.problem(
                        f"{path}.{name}",
                        f"{_describe(item)} is not a separator of priority queues: 1 to "
                        f"{MAX_REDIS_SEPARATOR_LENGTH} characters",
                    )
            elif isinstance(item, str) and REDIS_KEY_NAME_PATTERN.fullmatch(item):
                options.append((name, item))
            else:
                self.problem(
                    f"{path}.{name}",
                    f"{_describe(item)} is not a Redis key name: 1 to 200 printable characters, "
                    "no spaces",
                )
        return tuple(options)

    def schedule(self, value: Any) -> Schedule:
        path = "spec.schedule"
        raw = self.mapping(value, path, allowed=("sweepInterval", "suspend"))
        interval = raw.get("sweepInterval", DEFAULT_SWEEP_INTERVAL)
        seconds = self.duration(
            interval, f"{path}.sweepInterval", maximum_seconds=MAX_SWEEP_INTERVAL_SECONDS
        )
        if 0 < seconds < MIN_SWEEP_INTERVAL_SECONDS:
            self.problem(
                f"{path}.sweepInterval",
                f"{interval!r} is shorter than {MIN_SWEEP_INTERVAL_SECONDS:g}s; a sweep more "
                "often than that only loads the database (due retries wake the loop anyway)",
            )
        return Schedule(
            sweep_interval_seconds=max(seconds, MIN_SWEEP_INTERVAL_SECONDS),
            suspend=self.boolean(raw.get("suspend", False), f"{path}.suspend"),
        )

    def retry(self, value: Any) -> Retry:
        path = "spec.retry"
        raw = self.mapping(
            value,
            path,
            allowed=("maxAttempts", "initialDelay", "factor", "maxDelay", "jitter"),
        )
        initial = self.duration(
            raw.get("initialDelay", DEFAULT_INITIAL_DELAY),
            f"{path}.initialDelay",
            maximum_seconds=MAX_DELAY_SECONDS,
        )
        maximum = self.duration(
            raw.get("maxDelay", DEFAULT_MAX_DELAY),
            f"{path}.maxDelay",
            maximum_seconds=MAX_DELAY_SECONDS,
        )
        if maximum < initial:
            self.problem(
                f"{path}.maxDelay",
                f"{raw.get('maxDelay', DEFAULT_MAX_DELAY)!r} is shorter than initialDelay "
                f"{raw.get('initialDelay', DEFAULT_INITIAL_DELAY)!r}",
            )
        return Retry(
            max_attempts=self.integer(
                raw.get("maxAttempts", DEFAULT_MAX_ATTEMPTS),
                f"{path}.maxAttempts",
                minimum=1,
                maximum=MAX_ATTEMPTS_LIMIT,
            ),
            initial_delay_seconds=initial,
            backoff_factor=self.number(
                raw.get("factor", DEFAULT_BACKOFF_FACTOR),
                f"{path}.factor",
                minimum=1.0,
                maximum=MAX_BACKOFF_FACTOR,
            ),
            max_delay_seconds=max(maximum, initial),
            jitter=self.boolean(raw.get("jitter", True), f"{path}.jitter"),
        )

    def lease(self, value: Any) -> Lease:
        path = "spec.lease"
        raw = self.mapping(value, path, allowed=("timeout",))
        return Lease(
            timeout_seconds=self.duration(
                raw.get("timeout", DEFAULT_LEASE_TIMEOUT),
                f"{path}.timeout",
                maximum_seconds=MAX_LEASE_SECONDS,
            )
        )

    def history(self, value: Any) -> History:
        path = "spec.history"
        raw = self.mapping(value, path, allowed=("retention",))
        retention = self.duration(
            raw.get("retention", DEFAULT_HISTORY_RETENTION),
            f"{path}.retention",
            maximum_seconds=MAX_HISTORY_RETENTION_SECONDS,
        )
        if retention < MIN_HISTORY_RETENTION_SECONDS:
            self.problem(f"{path}.retention", "must be at least 1m")
        return History(retention_seconds=retention)

    def workers(self, value: Any) -> Workers:
        path = "spec.workers"
        raw = self.mapping(value, path, allowed=("podSelector", "startTimeout"))
        start_timeout = self.duration(
            raw.get("startTimeout", DEFAULT_START_TIMEOUT),
            f"{path}.startTimeout",
            maximum_seconds=MAX_START_TIMEOUT_SECONDS,
        )
        selector = self.mapping(
            raw.get("podSelector"),
            f"{path}.podSelector",
            allowed=("matchLabels", "matchExpressions"),
        )
        if "podSelector" in raw and not (
            selector.get("matchLabels") or selector.get("matchExpressions")
        ):
            self.problem(
                f"{path}.podSelector",
                "is empty, which would select every pod in the namespace; give matchLabels "
                "or matchExpressions of the worker pods, or leave workers out",
            )
        labels: list[tuple[str, str]] = []
        match_labels = selector.get("matchLabels") or {}
        if not isinstance(match_labels, Mapping):
            self.problem(f"{path}.podSelector.matchLabels", "must be a map of label: value")
            match_labels = {}
        for key, label_value in match_labels.items():
            label_path = f"{path}.podSelector.matchLabels[{_describe(key)}]"
            if not is_label_key(key):
                self.problem(label_path, f"{_describe(key)} is not a label key{LABEL_KEY_HINT}")
            elif not is_label_value(label_value):
                self.problem(
                    label_path, f"{_describe(label_value)} is not a label value{LABEL_VALUE_HINT}"
                )
            else:
                labels.append((key, label_value))
        expressions: list[LabelSelectorRequirement] = []
        raw_expressions = selector.get("matchExpressions") or []
        if not isinstance(raw_expressions, list):
            self.problem(f"{path}.podSelector.matchExpressions", "must be a list")
            raw_expressions = []
        for index, item in enumerate(raw_expressions):
            requirement = self.selector_requirement(
                item, f"{path}.podSelector.matchExpressions[{index}]"
            )
            if requirement is not None:
                expressions.append(requirement)
        return Workers(
            match_labels=tuple(sorted(labels)),
            match_expressions=tuple(expressions),
            start_timeout_seconds=start_timeout,
        )

    def selector_requirement(self, value: Any, path: str) -> LabelSelectorRequirement | None:
        expression = self.mapping(value, path, allowed=("key", "operator", "values"))
        key = expression.get("key")
        operator = expression.get("operator")
        values = expression.get("values") or []
        problems_before = len(self.problems)
        if not is_label_key(key):
            self.problem(f"{path}.key", f"{_describe(key)} is not a label key{LABEL_KEY_HINT}")
        if operator not in SELECTOR_OPERATORS:
            self.problem(f"{path}.operator", f"must be one of {', '.join(SELECTOR_OPERATORS)}")
        if not isinstance(values, list):
            self.problem(f"{path}.values", "must be a list of label values")
            values = []
        for position, item in enumerate(values):
            if not is_label_value(item):
                self.problem(
                    f"{path}.values[{position}]",
                    f"{_describe(item)} is not a label value{LABEL_VALUE_HINT}",
                )
        if operator in ("In", "NotIn") and not values:
            self.problem(f"{path}.values", f"must not be empty for operator {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            self.problem(f"{path}.values", f"must be empty for operator {operator}")
        if len(self.problems) != problems_before:
            return None
        return LabelSelectorRequirement(key=str(key), operator=str(operator), values=tuple(values))

    def limits(self, value: Any) -> Limits:
        path = "spec.limits"
        raw = self.mapping(value, path, allowed=("batchSize", "maxInFlight", "dispatchPerSecond"))
        batch_size = self.integer(
            raw.get("batchSize", DEFAULT_BATCH_SIZE),
            f"{path}.batchSize",
            minimum=1,
            maximum=MAX_BATCH_SIZE,
        )
        problems_before = len(self.problems)
        max_in_flight = self.integer(
            raw.get("maxInFlight", DEFAULT_MAX_IN_FLIGHT),
            f"{path}.maxInFlight",
            minimum=1,
            maximum=MAX_MAX_IN_FLIGHT,
        )
        if len(self.problems) == problems_before and batch_size > max_in_flight:
            self.problem(
                f"{path}.batchSize",
                f"{batch_size} is larger than maxInFlight {max_in_flight}; a page can never "
                "exceed what may be in flight",
            )
        rate = raw.get("dispatchPerSecond", 0)
        return Limits(
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            dispatch_per_second=0.0
            if rate == 0 and not isinstance(rate, bool)
            else self.number(
                rate,
                f"{path}.dispatchPerSecond",
                minimum=MIN_DISPATCH_PER_SECOND,
                maximum=MAX_DISPATCH_PER_SECOND,
            ),
        )


LABEL_KEY_HINT = (
    " (an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' "
    "or '.', beginning and ending with a letter or digit)"
)
LABEL_VALUE_HINT = (
    " (at most 63 letters, digits, '-', '_' or '.', beginning and ending with a letter or "
    "digit, or empty)"
)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g}h"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    if isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"
