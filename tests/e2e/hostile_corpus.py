"""Hostile and invalid ProcessingPolicies, each with the outcome the product promises.

What a new user (or someone with ``edit`` rights and bad intent) may write into a policy:
SQL and Unicode tricks in every string field, numbers beyond every bound, wrong types.
Each case changes the valid demo policy in one place and says what must happen:

* ``expect="refused"``: ``kubectl apply`` refuses it, and the error names ``field``
  (and contains ``reason``, when given) — the operator never sees it;
* ``expect="degraded"``: it is accepted, and the operator reports ``Degraded=True`` with
  the condition reason ``reason``, naming ``field`` in the message.

A plain module (pytest puts tests/e2e on sys.path), so other suites can reuse the table;
add a case by adding a line. Cases that are applied for real (``degraded``) use the Secrets
``demo-db`` and ``demo-broker`` of the test's namespace.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

from celery_app.demo import schema

Expect = Literal["refused", "degraded"]


@dataclasses.dataclass(frozen=True)
class Case:
    """``spec.<path> = value`` in the valid policy, then ``expect`` naming ``field``."""

    name: str
    path: str
    value: Any
    field: str
    expect: Expect = "refused"
    reason: str | None = None

    def spec(self) -> dict[str, Any]:
        spec = copy.deepcopy(VALID_SPEC)
        *parents, leaf = self.path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = self.value
        return spec


VALID_SPEC: dict[str, Any] = schema.policy_spec(sweep_interval="2s", lease_timeout="10m")
VALID_SPEC["workers"] = {"podSelector": {"matchLabels": {"app": "insights-worker"}}}


def _selector_expression(key: str, operator: str, values: list[str] | None = None) -> Any:
    expression: dict[str, Any] = {"key": key, "operator": operator}
    if values is not None:
        expression["values"] = values
    return {"matchExpressions": [expression]}


LABELS = "spec.workers.podSelector.matchLabels"
EXPRESSION = "spec.workers.podSelector.matchExpressions[0]"

CASES: list[Case] = [
    # --- SQL and Unicode in identifiers: each part must be [A-Za-z_][A-Za-z0-9_]{0,62}
    Case("table: statement after", "source.table", "journal_entry; DROP TABLE journal_entry",
         "spec.source.table"),
    Case("table: comment", "source.table", "journal_entry--", "spec.source.table"),
    Case("table: quoted parts", "source.table", '"public"."journal_entry"', "spec.source.table"),
    Case("table: NUL byte", "source.table", "journal\x00entry", "spec.source.table"),
    Case("table: Cyrillic o", "source.table", "j\u043eurnal_entry", "spec.source.table"),
    Case("table: trailing newline", "source.table", "journal_entry\n", "spec.source.table"),
    Case("table: right-to-left override", "source.table", "\u202ejournal_entry",
         "spec.source.table"),
    Case("table: part of 64 characters", "source.table", "public." + "t" * 64,
         "spec.source.table"),
    Case("table: empty", "source.table", "", "spec.source.table"),
    Case("table: a number", "source.table", 42, "spec.source.table"),
    Case("idColumn: cast", "source.idColumn", "id::text", "spec.source.idColumn"),
    Case("idColumn: zero-width space", "source.idColumn", "id\u200b", "spec.source.idColumn"),
    Case("orderBy: direction", "source.orderBy", "created_at DESC NULLS LAST",
         "spec.source.orderBy"),
    Case("orderBy: subquery", "source.orderBy", "(SELECT 1)", "spec.source.orderBy"),
    Case("pending column: tautology", "source.pending.column", "insights_extracted OR 1=1",
         "spec.source.pending.column"),
    Case("pending column: dotless i", "source.pending.column", "\u0131nsights_extracted",
         "spec.source.pending.column"),
    # --- predicate values are bound parameters, but still bounded and typed
    Case("equals: 1025 characters", "source.pending.equals", "x" * 1025,
         "spec.source.pending.equals"),
    Case("in: a value of 1025 characters", "source.pending",
         {"column": "status", "in": ["x" * 1025]}, "spec.source.pending.in[0]"),
    Case("in: 65 values", "source.pending",
         {"column": "status", "in": [f"s{i}" for i in range(65)]}, "spec.source.pending.in"),
    Case("in: duplicate values", "source.pending",
         {"column": "status", "in": ["new", "new"]}, "spec.source.pending.in[1]"),
    Case("isNull: a string", "source.pending", {"column": "processed_at", "isNull": "true"},
         "spec.source.pending.isNull"),
    # --- task and queue names: published to the broker, shown in logs
    Case("task: shell", "task.name", "insights.tasks.x; rm -rf /", "spec.task.name"),
    Case("task: trailing newline", "task.name", "insights.tasks.x\n", "spec.task.name"),
    Case("task: Cyrillic a", "task.name", "insights.t\u0430sks.x", "spec.task.name"),
    Case("task: 256 characters", "task.name", "t" * 256, "spec.task.name"),
    Case("task: a number", "task.name", 123, "spec.task.name"),
    Case("queue: space", "task.queue", "insights queue", "spec.task.queue"),
    Case("queue: NUL byte", "task.queue", "insights\x00", "spec.task.queue"),
    Case("queue: glob", "task.queue", "*", "spec.task.queue"),
    Case("queue: path", "task.queue", "../../etc", "spec.task.queue"),
    # --- Secret references: a name in the policy's namespace, nothing else
    Case("database Secret: other namespace", "source.databaseSecretRef.name",
         "../kube-system/admin", "spec.source.databaseSecretRef.name"),
    Case("database Secret key: space", "source.databaseSecretRef.key", "dsn value",
         "spec.source.databaseSecretRef.key"),
    Case("broker Secret: upper case", "task.brokerSecretRef.name", "Celery-Broker",
         "spec.task.brokerSecretRef.name"),
    # --- the pod selector: Kubernetes label syntax, so no key or value can change the
    #     meaning of the selector string the watch sends
    Case("label key: a second requirement", "workers.podSelector",
         {"matchLabels": {"app,tier": "x"}}, LABELS, reason="label key"),
    Case("label key: a negation", "workers.podSelector",
         {"matchLabels": {"app!=x,app": "y"}}, LABELS, reason="label key"),
    Case("label key: upper-case prefix", "workers.podSelector",
         {"matchLabels": {"Example.com/app": "x"}}, LABELS, reason="label key"),
    Case("label value: a set", "workers.podSelector",
         {"matchLabels": {"app": "a,tier in (b)"}}, LABELS),
    Case("label value: 64 characters", "workers.podSelector",
         {"matchLabels": {"app": "v" * 64}}, LABELS),
    Case("expression key: injection", "workers.podSelector",
         _selector_expression("app,tier!=x", "Exists"), f"{EXPRESSION}.key"),
    Case("expression key: set syntax", "workers.podSelector",
         _selector_expression("app in (a),b", "Exists"), f"{EXPRESSION}.key"),
    Case("expression key: fullwidth letter", "workers.podSelector",
         _selector_expression("\uff41pp", "Exists"), f"{EXPRESSION}.key"),
    Case("expression key: prefix of 254 characters", "workers.podSelector",
         _selector_expression("p" * 254 + "/app", "Exists"), f"{EXPRESSION}.key"),
    Case("expression key: name of 64 characters", "workers.podSelector",
         _selector_expression("k" * 64, "Exists"), f"{EXPRESSION}.key"),
    Case("expression operator: lower case", "workers.podSelector",
         _selector_expression("app", "in", ["x"]), f"{EXPRESSION}.operator"),
    Case("expression operator: != ", "workers.podSelector",
         _selector_expression("app", "!=", ["x"]), f"{EXPRESSION}.operator"),
    Case("expression In without values", "workers.podSelector",
         _selector_expression("app", "In"), f"{EXPRESSION}.values"),
    Case("expression Exists with values", "workers.podSelector",
         _selector_expression("app", "Exists", ["x"]), f"{EXPRESSION}.values"),
    Case("expression value: space", "workers.podSelector",
         _selector_expression("app", "In", ["a b"]), f"{EXPRESSION}.values[0]"),
    Case("expression value: closing parenthesis", "workers.podSelector",
         _selector_expression("app", "NotIn", ["a),!b"]), f"{EXPRESSION}.values[0]"),
    # --- numbers: every one bounded, so arithmetic on them stays finite
    Case("maxAttempts: 1001", "retry.maxAttempts", 1001, "spec.retry.maxAttempts"),
    Case("maxAttempts: a string", "retry.maxAttempts", "5", "spec.retry.maxAttempts"),
    Case("maxAttempts: a fraction", "retry.maxAttempts", 2.5, "spec.retry.maxAttempts"),
    Case("factor: 101", "retry.factor", 101, "spec.retry.factor"),
    Case("factor: a string", "retry.factor", "2", "spec.retry.factor"),
    Case("batchSize: 0", "limits.batchSize", 0, "spec.limits.batchSize"),
    Case("batchSize: 50001", "limits", {"batchSize": 50001, "maxInFlight": 100000},
         "spec.limits.batchSize"),
    Case("maxInFlight: 10000001", "limits.maxInFlight", 10_000_001, "spec.limits.maxInFlight"),
    Case("dispatchPerSecond: tiny", "limits.dispatchPerSecond", 1e-9,
         "spec.limits.dispatchPerSecond"),
    Case("dispatchPerSecond: negative", "limits.dispatchPerSecond", -1,
         "spec.limits.dispatchPerSecond"),
    Case("dispatchPerSecond: huge", "limits.dispatchPerSecond", 1e12,
         "spec.limits.dispatchPerSecond"),
    # --- durations: Go syntax, ASCII digits, bounded above
    Case("lease: 169h", "lease.timeout", "169h", "spec.lease.timeout", reason="at most 168h"),
    Case("maxDelay: beyond Go's range", "retry.maxDelay", "100000000h", "spec.retry.maxDelay"),
    Case("initialDelay: exponent", "retry.initialDelay", "1e3s", "spec.retry.initialDelay"),
    Case("sweepInterval: 25h", "schedule.sweepInterval", "25h", "spec.schedule.sweepInterval",
         reason="at most 24h"),
    Case("sweepInterval: fullwidth digit", "schedule.sweepInterval", "\uff15m",
         "spec.schedule.sweepInterval"),
    Case("startTimeout: 0s", "workers.startTimeout", "0s", "spec.workers.startTimeout"),
    Case("startTimeout: 25h", "workers.startTimeout", "25h", "spec.workers.startTimeout"),
    Case("history retention: 87601h", "history.retention", "87601h", "spec.history.retention"),
    # --- wrong types
    Case("suspend: a string", "schedule.suspend", "yes", "spec.schedule.suspend"),
    Case("jitter: a number", "retry.jitter", 1, "spec.retry.jitter"),
    Case("schedule: a string", "schedule", "5m", "spec.schedule"),
    Case("workers: a list", "workers", ["insights-worker"], "spec.workers"),
]  # fmt: skip
