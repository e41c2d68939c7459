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
        if self.expect == "degraded":
            # A task of its own: accepted cases on one table must not overlap each other
            # (same table and task), or all but the oldest would report Conflict instead.
            spec["task"]["name"] = "corpus." + "".join(
                char if char.isalnum() else "_" for char in self.name
            )
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
    # --- Redis key names of the app's kombu: the operator publishes onto and reads them
    Case("Redis key: space", "task.brokerTransportOptions", {"unacked_key": "un acked"},
         "spec.task.brokerTransportOptions.unacked_key"),
    Case("Redis key prefix: newline", "task.brokerTransportOptions",
         {"global_keyprefix": "app\n"}, "spec.task.brokerTransportOptions.global_keyprefix"),
    Case("priority step: beyond 255", "task.brokerTransportOptions",
         {"priority_steps": [0, 256]}, "spec.task.brokerTransportOptions.priority_steps[1]"),
    Case("a transport option of the workers alone", "task.brokerTransportOptions",
         {"visibility_timeout": 3600}, "spec.task.brokerTransportOptions.visibility_timeout",
         reason="unknown field"),
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
    # --- accepted by the schema, degraded by the operator with a reason naming the field
    Case("a table that does not exist", "source.table", "public.no_such_table",
         "spec.source.table", expect="degraded", reason="SourceInvalid"),
    Case("a pending column that does not exist", "source.pending",
         {"column": "no_such_column", "equals": False}, "spec.source.pending.column",
         expect="degraded", reason="SourceInvalid"),
    Case("an integer for a boolean column", "source.pending",
         {"column": "insights_extracted", "equals": 1}, "spec.source.pending.equals",
         expect="degraded", reason="SourceInvalid"),
    Case("a word for a boolean column", "source.pending",
         {"column": "insights_extracted", "equals": "nope'; DROP TABLE journal_entry; --"},
         "spec.source.pending.equals", expect="degraded", reason="SourceInvalid"),
    Case("not a date for a timestamp column", "source.pending",
         {"column": "created_at", "equals": "not-a-date"}, "spec.source.pending.equals",
         expect="degraded", reason="SourceInvalid"),
    Case("a database Secret that does not exist", "source.databaseSecretRef",
         {"name": "no-such-secret", "key": "dsn"}, "spec.source.databaseSecretRef",
         expect="degraded", reason="SecretNotFound"),
    Case("a database Secret key that does not exist", "source.databaseSecretRef",
         {"name": "demo-db", "key": "no-such-key"}, "spec.source.databaseSecretRef",
         expect="degraded", reason="SecretNotFound"),
    Case("a broker URL where the DSN should be", "source.databaseSecretRef",
         {"name": "demo-broker", "key": "url"}, "spec.source.databaseSecretRef",
         expect="degraded", reason="SecretInvalid"),
    Case("a DSN where the broker URL should be", "task.brokerSecretRef",
         {"name": "demo-db", "key": "dsn"}, "spec.task.brokerSecretRef",
         expect="degraded", reason="SecretInvalid"),
    # --- wrong types
    Case("suspend: a string", "schedule.suspend", "yes", "spec.schedule.suspend"),
    Case("jitter: a number", "retry.jitter", 1, "spec.retry.jitter"),
    Case("schedule: a string", "schedule", "5m", "spec.schedule"),
    Case("workers: a list", "workers", ["insights-worker"], "spec.workers"),
]  # fmt: skip


# --- issue 22's classes: what reaches the operator other than a spec -------------------------
#
# Each table is run where the behaviour lives, the cheapest real way: the annotations by
# ``tests/unit/test_hostile_corpus_classes.py`` against the operator's validation (and the
# retry-dead ones by ``test_hostile_annotations.py`` through the apiserver), the
# cross-namespace spellings and the ledger logins against real PostgreSQL
# (``tests/integration/test_overlaps.py``, ``tests/integration/test_ledger_roles.py``).

AnnotationExpect = Literal["acted on", "removed"]


@dataclasses.dataclass(frozen=True)
class AnnotationCase:
    """An annotation anyone with ``edit`` may set on a policy: the operator acts on it, or
    removes it with a Warning Event (``InvalidRequest``) and sweeps on."""

    name: str
    key: str
    value: str
    expect: AnnotationExpect


_RETRY_DEAD = "celery-reconciler.io/retry-dead"
_DIFFBASE = "celery-reconciler.io/last-handled-configuration"

ANNOTATION_CASES = (
    AnnotationCase("retry-dead: NUL after an id", _RETRY_DEAD, "7\x00", "removed"),
    AnnotationCase("retry-dead: SOH alone", _RETRY_DEAD, "\x01", "removed"),
    AnnotationCase("retry-dead: terminal escape", _RETRY_DEAD, "1,\x1b[31m2", "removed"),
    AnnotationCase("retry-dead: DEL", _RETRY_DEAD, "\x7f", "removed"),
    AnnotationCase("retry-dead: id of 300 characters", _RETRY_DEAD, "x" * 300, "removed"),
    AnnotationCase("retry-dead: over 64 KiB", _RETRY_DEAD, "1," * 40_000, "removed"),
    AnnotationCase("retry-dead: commas only", _RETRY_DEAD, ",,,", "removed"),
    AnnotationCase("retry-dead: all", _RETRY_DEAD, "all", "acted on"),
    AnnotationCase("retry-dead: ids with spaces", _RETRY_DEAD, " 1, 2 ,3", "acted on"),
    # An id is a bound parameter: SQL in it is an id that matches no entry.
    AnnotationCase(
        "retry-dead: SQL as an id", _RETRY_DEAD, "1'); DELETE FROM journal_entry; --", "acted on"
    ),
    AnnotationCase("diff-base: not JSON", _DIFFBASE, "{not json", "removed"),
    AnnotationCase("diff-base: a JSON array", _DIFFBASE, "[]", "removed"),
    AnnotationCase("diff-base: a JSON string", _DIFFBASE, '"spec"', "removed"),
    AnnotationCase("diff-base: JSON null", _DIFFBASE, "null", "removed"),
    AnnotationCase("diff-base: a JSON object", _DIFFBASE, '{"spec": {}}', "acted on"),
)


@dataclasses.dataclass(frozen=True)
class CrossNamespaceCase:
    """A second policy, in another namespace, on the same rows as the first but spelled
    differently: the ledger of their one database must make the younger yield."""

    name: str
    first_table: str  # "table" or "schema.table"
    second_table: str
    second_dsn_as_key_values: bool  # the same database through a key=value DSN


CROSS_NAMESPACE_CASES = (
    CrossNamespaceCase("same spelling", "journal_entry", "journal_entry", False),
    CrossNamespaceCase("schema-qualified", "journal_entry", "public.journal_entry", False),
    CrossNamespaceCase("key=value DSN", "public.journal_entry", "journal_entry", True),
)


@dataclasses.dataclass(frozen=True)
class LedgerCase:
    """A statement a login of the worker's or the reader's role tries on the ledger; the
    server must refuse it for want of a right (SQLSTATE 42501)."""

    name: str
    login: Literal["worker", "reader"]
    statement: str


LEDGER_CASES = (
    *(
        LedgerCase(f"{login} reads {table}", login, f"SELECT * FROM celery_reconciler.{table}")  # noqa: S608 (our names)
        for login in ("worker", "reader")
        for table in (
            "entries",
            "attempts",
            "incarnations",
            "policies",
            "tallies",
            "policy_owners",
            "sweeps",
            "policy_work",
        )
    ),
    LedgerCase(
        "worker marks entries dead", "worker", "UPDATE celery_reconciler.entries SET state = 'dead'"
    ),
    LedgerCase(
        "worker ends incarnations",
        "worker",
        "UPDATE celery_reconciler.incarnations SET ended_at = now()",
    ),
    LedgerCase(
        "worker forges an owner row",
        "worker",
        "INSERT INTO celery_reconciler.policy_owners (policy_key, holder, token) "
        "VALUES ('test/journal-insights', 'evil/1', 9223372036854775807)",
    ),
    LedgerCase(
        "worker takes over an owner row",
        "worker",
        "UPDATE celery_reconciler.policy_owners SET holder = 'evil/1'",
    ),
    LedgerCase(
        "worker forges recorded work",
        "worker",
        "INSERT INTO celery_reconciler.policy_work (policy_key, policy_uid, created, "
        "table_name, pending, task_name) VALUES ('a/b', 'u', '0', 't', 'p', 'x')",
    ),
    LedgerCase(
        "worker removes recorded work", "worker", "DELETE FROM celery_reconciler.policy_work"
    ),
    LedgerCase(
        "worker writes an attempt",
        "worker",
        "INSERT INTO celery_reconciler.attempts (policy_key, entry_id, attempt, fence_token, "
        "outcome, started_at) VALUES ('x', '1', 1, gen_random_uuid(), 'failed', now())",
    ),
    LedgerCase(
        "worker rewrites a policy's rules",
        "worker",
        "UPDATE celery_reconciler.policies SET max_attempts = 1",
    ),
    LedgerCase("worker creates a table", "worker", "CREATE TABLE celery_reconciler.evil (id int)"),
    LedgerCase("worker drops the schema", "worker", "DROP SCHEMA celery_reconciler CASCADE"),
    LedgerCase(
        "reader ends incarnations",
        "reader",
        "SELECT celery_reconciler.worker_end_incarnations(ARRAY[]::uuid[], 'x')",
    ),
    LedgerCase(
        "reader starts an attempt",
        "reader",
        "SELECT * FROM celery_reconciler.worker_start_attempt("
        "gen_random_uuid(), NULL, 'x', NULL, NULL)",
    ),
)


@dataclasses.dataclass(frozen=True)
class LeaseCase:
    """A member Lease anyone with ``edit`` in the operator's namespace may apply next to the
    replicas' own (replicas ``replica-a`` and ``replica-b``, each in a Pod of that name):
    no replica counts it, and each names it in a Warning Event saying ``why``."""

    name: str
    lease_of: str  # the Lease is named as the member Lease of this (pod) name
    holder: str
    pod_name: str | None  # the Pod named on it (None: no proof at all)
    pod_uid: Literal["real", "made-up"]  # that Pod's real uid, or one made up
    why: str

    def annotations(self, *, uids: dict[str, str]) -> dict[str, str]:
        if self.pod_name is None:
            return {}
        uid = uids.get(self.pod_name, "") if self.pod_uid == "real" else "0000-made-up"
        return {
            "celery-reconciler.io/replica-pod": self.pod_name,
            "celery-reconciler.io/replica-pod-uid": uid,
        }


LEASE_CASES = (
    LeaseCase("no proof", "replica-x", "replica-x/00000000", None, "made-up",
              "names no replica Pod"),
    LeaseCase("a Pod that does not exist", "ghost", "ghost/00000000", "ghost", "made-up",
              "no Pod of that name carries the replica labels"),
    # A real replica's Pod name and uid copied onto a Lease of another name.
    LeaseCase("a replica's proof copied", "replica-y", "replica-a/00000000", "replica-a", "real",
              "whose member Lease is"),
    LeaseCase("a replica's Pod, another holder", "replica-z", "evil/1", "replica-b", "made-up",
              "whose member Lease is"),
)  # fmt: skip
