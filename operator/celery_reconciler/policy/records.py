"""The typed ProcessingPolicy: the frozen dataclasses everything downstream works on.

Planning, the ledger, the source reader, the broker, the kopf handlers and the CLI take a
``Policy`` and never the raw dict; ``parse`` is the one place that builds one. A spec that
cannot be used is an ``InvalidPolicy`` listing every ``Problem``, each with its field path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from celery_reconciler_worker import backoff


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
    # (option, value) pairs of task_section.BROKER_KEY_OPTIONS the app sets; kombu's defaults
    # for the rest.
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
