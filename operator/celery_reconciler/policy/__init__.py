"""The typed ProcessingPolicy: one parse of the user's ``spec`` into frozen dataclasses.

Everything downstream (planning, the ledger, the source reader, the broker, the kopf
handlers, the CLI) works on a ``Policy`` and never on the raw dict, so validation happens in
exactly one place and a bad spec is rejected before it can reach SQL or a broker.

The package is the parser in parts, one a section of the spec (``source_section``,
``task_section``, ``timing_sections``, ``workers_section``, ``limits_section``) over the
shared ``fields`` readers; ``parse`` puts them in order. This face re-exports what the rest
of the operator uses, so callers write ``policy.Policy`` and ``policy.parse_policy`` wherever
the parts live.

It is pure: it imports no psycopg, celery, kopf or kubernetes (only the worker's pure
``backoff``, which owns the ``Retry`` record), so the CLI and the unit tests can load it
anywhere.
"""

from celery_reconciler.policy.durations import InvalidDuration, parse_duration_seconds
from celery_reconciler.policy.fields import IDENTIFIER_PATTERN
from celery_reconciler.policy.label_syntax import is_label_key, is_label_value
from celery_reconciler.policy.parse import parse_policy
from celery_reconciler.policy.records import (
    History,
    InvalidPolicy,
    LabelSelectorRequirement,
    Lease,
    Limits,
    PendingEquals,
    PendingIn,
    PendingIsNull,
    PendingPredicate,
    Policy,
    Problem,
    Retry,
    Schedule,
    SecretRef,
    Source,
    TableName,
    Task,
    Workers,
)

__all__ = [
    "IDENTIFIER_PATTERN",
    "History",
    "InvalidDuration",
    "InvalidPolicy",
    "LabelSelectorRequirement",
    "Lease",
    "Limits",
    "PendingEquals",
    "PendingIn",
    "PendingIsNull",
    "PendingPredicate",
    "Policy",
    "Problem",
    "Retry",
    "Schedule",
    "SecretRef",
    "Source",
    "TableName",
    "Task",
    "Workers",
    "is_label_key",
    "is_label_value",
    "parse_duration_seconds",
    "parse_policy",
]
