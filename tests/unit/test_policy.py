"""ProcessingPolicy parsing: defaults, every predicate form, and errors that name the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from celery_reconciler import policy


def full_spec() -> dict[str, Any]:
    return {
        "source": {
            "databaseSecretRef": {"name": "mindjourney-db", "key": "dsn"},
            "table": "public.journal_entry",
            "idColumn": "id",
            "pending": {"column": "insights_extracted", "equals": False},
            "orderBy": "created_at",
        },
        "task": {
            "name": "insights.tasks.extract_insights_task",
            "brokerSecretRef": {"name": "celery-broker", "key": "url"},
            "queue": "insights",
        },
        "schedule": {"sweepInterval": "5m", "suspend": False},
        "retry": {
            "maxAttempts": 5,
            "initialDelay": "60s",
            "factor": 2.0,
            "maxDelay": "1h",
            "jitter": True,
        },
        "lease": {"timeout": "15m"},
        "workers": {"podSelector": {"matchLabels": {"app": "insights-worker"}}},
        "limits": {"batchSize": 500, "maxInFlight": 10000, "dispatchPerSecond": 0},
    }


def parse(spec: dict[str, Any], **kwargs: Any) -> policy.Policy:
    return policy.parse_policy(spec, namespace="mindjourney", name="journal-insights", **kwargs)


def problems_of(spec: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    with pytest.raises(policy.InvalidPolicy) as caught:
        parse(spec, **kwargs)
    return {problem.path: problem.message for problem in caught.value.problems}


def test_full_spec_parses_into_typed_values() -> None:
    parsed = parse(full_spec())
    assert parsed.key == "mindjourney/journal-insights"
    assert parsed.source.table == policy.TableName(schema="public", table="journal_entry")
    assert parsed.source.pending == policy.PendingEquals(column="insights_extracted", value=False)
    assert parsed.source.order_by == "created_at"
    assert parsed.source.database_secret == policy.SecretRef(name="mindjourney-db", key="dsn")
    assert parsed.task == policy.Task(
        name="insights.tasks.extract_insights_task",
        broker_secret=policy.SecretRef(name="celery-broker", key="url"),
        queue="insights",
    )
    assert parsed.schedule == policy.Schedule(sweep_interval_seconds=300.0, suspend=False)
    assert parsed.retry == policy.Retry(
        max_attempts=5,
        initial_delay_seconds=60.0,
        backoff_factor=2.0,
        max_delay_seconds=3600.0,
        jitter=True,
    )
    assert parsed.lease.timeout_seconds == 900.0
    assert parsed.workers.match_labels == (("app", "insights-worker"),)
    assert parsed.limits == policy.Limits(
        batch_size=500, max_in_flight=10000, dispatch_per_second=0
    )


def test_minimal_spec_takes_documented_defaults() -> None:
    parsed = parse(
        {
            "source": {
                "databaseSecretRef": {"name": "db"},
                "table": "Entries",
                "pending": {"column": "processed_at", "isNull": True},
            },
            "task": {"name": "tasks.process", "brokerSecretRef": {"name": "broker"}},
        }
    )
    assert parsed.source.table == policy.TableName(schema=None, table="Entries")
    assert parsed.source.id_column == "id"
    assert parsed.source.order_by == "id" and parsed.source.orders_by_id
    assert parsed.source.database_secret == policy.SecretRef(name="db", key="dsn")
    assert parsed.task.broker_secret == policy.SecretRef(name="broker", key="url")
    assert parsed.task.queue == "celery"
    assert parsed.retry.max_attempts == 5 and parsed.retry.initial_delay_seconds == 60
    assert parsed.lease.timeout_seconds == 900
    assert parsed.history.retention_seconds == 7 * 24 * 3600
    assert parsed.limits.batch_size == 500 and parsed.limits.max_in_flight == 10000
    assert (parsed.workers.match_labels, parsed.workers.match_expressions) == ((), ())


@pytest.mark.parametrize(
    ("pending", "expected"),
    [
        (
            {"column": "status", "in": ["new", "failed"]},
            policy.PendingIn("status", ("new", "failed")),
        ),
        ({"column": "stage", "in": [0, 3]}, policy.PendingIn("stage", (0, 3))),
        ({"column": "done_at", "isNull": False}, policy.PendingIsNull("done_at", is_null=False)),
        ({"column": "status", "equals": "new"}, policy.PendingEquals("status", "new")),
        ({"column": "stage", "equals": 0}, policy.PendingEquals("stage", 0)),
    ],
)
def test_every_predicate_form(pending: dict[str, Any], expected: policy.PendingPredicate) -> None:
    spec = full_spec()
    spec["source"]["pending"] = pending
    assert parse(spec).source.pending == expected


def test_secret_refs_are_optional_only_when_asked() -> None:
    spec = full_spec()
    del spec["source"]["databaseSecretRef"]
    del spec["task"]["brokerSecretRef"]
    assert parse(spec, require_secret_refs=False).source.database_secret is None
    problems = problems_of(spec)
    assert set(problems) == {"spec.source.databaseSecretRef", "spec.task.brokerSecretRef"}


@pytest.mark.parametrize(
    "table",
    ["journal; drop table users", 'public."journal"', "a.b.c", "1table", "x" * 64, "", "tab le"],
)
def test_tables_that_are_not_identifiers_are_rejected(table: str) -> None:
    spec = full_spec()
    spec["source"]["table"] = table
    problems = problems_of(spec)
    assert list(problems) == ["spec.source.table"]


def test_sql_fragments_in_column_names_are_rejected_naming_each_field() -> None:
    spec = full_spec()
    spec["source"]["idColumn"] = "id) or (1=1"
    spec["source"]["orderBy"] = "created_at desc"
    spec["source"]["pending"]["column"] = "flag = false --"
    problems = problems_of(spec)
    assert set(problems) == {
        "spec.source.idColumn",
        "spec.source.orderBy",
        "spec.source.pending.column",
    }
    assert "'id) or (1=1' is not a SQL identifier" in problems["spec.source.idColumn"]


def test_every_problem_is_reported_at_once() -> None:
    spec = full_spec()
    spec["source"]["table"] = "x; drop"
    spec["retry"]["maxAttempts"] = 0
    spec["retry"]["initialDelay"] = "-5m"
    spec["lease"]["timeout"] = "soon"
    spec["limits"]["batchSize"] = -1
    spec["task"]["name"] = "has space"
    with pytest.raises(policy.InvalidPolicy) as caught:
        parse(spec)
    paths = [problem.path for problem in caught.value.problems]
    assert paths == [
        "spec.source.table",
        "spec.task.name",
        "spec.retry.initialDelay",
        "spec.retry.maxAttempts",
        "spec.lease.timeout",
        "spec.limits.batchSize",
    ]
    message = str(caught.value)
    assert message.startswith(
        "ProcessingPolicy mindjourney/journal-insights is invalid (6 problems)"
    )
    assert "spec.retry.maxAttempts: 0 is out of range; it must be between 1 and 1000" in message
    assert "spec.retry.initialDelay: '-5m' must be positive" in message
    assert "spec.source.table: 'x; drop' is not a SQL identifier" in message


@pytest.mark.parametrize(
    ("path", "value", "expected_path"),
    [
        (("schedule", "sweepInterval"), "-1s", "spec.schedule.sweepInterval"),
        (("schedule", "sweepInterval"), "0s", "spec.schedule.sweepInterval"),
        (("schedule", "sweepInterval"), 300, "spec.schedule.sweepInterval"),
        (("lease", "timeout"), "-15m", "spec.lease.timeout"),
        (("retry", "maxDelay"), "10s", "spec.retry.maxDelay"),
        (("retry", "factor"), 0.5, "spec.retry.factor"),
        (("retry", "jitter"), "yes", "spec.retry.jitter"),
        (("retry", "maxAttempts"), True, "spec.retry.maxAttempts"),
        (("retry", "maxAttempts"), 2.5, "spec.retry.maxAttempts"),
        (("limits", "maxInFlight"), 0, "spec.limits.maxInFlight"),
        (("limits", "batchSize"), 10001, "spec.limits.batchSize"),
        (("schedule", "sweepInterval"), "500ms", "spec.schedule.sweepInterval"),
        (("retry", "initialDelay"), "0s", "spec.retry.initialDelay"),
        (("retry", "maxAttempts"), 1001, "spec.retry.maxAttempts"),
        (("workers", "podSelector"), {}, "spec.workers.podSelector"),
        (("limits", "dispatchPerSecond"), -3, "spec.limits.dispatchPerSecond"),
        (("limits", "batchSize"), 10**9, "spec.limits.batchSize"),
        (("task", "queue"), "in sights", "spec.task.queue"),
        (("schedule", "suspend"), "false", "spec.schedule.suspend"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(
    path: tuple[str, str], value: Any, expected_path: str
) -> None:
    spec = full_spec()
    spec[path[0]][path[1]] = value
    assert list(problems_of(spec)) == [expected_path]


def test_predicate_needs_exactly_one_operator() -> None:
    spec = full_spec()
    spec["source"]["pending"] = {"column": "flag", "equals": False, "isNull": True}
    assert (
        "exactly one of equals, in or isNull (got equals, isNull)"
        in (problems_of(spec)["spec.source.pending"])
    )
    spec["source"]["pending"] = {"column": "flag"}
    assert "spec.source.pending" in problems_of(spec)
    spec["source"]["pending"] = {"column": "status", "in": []}
    assert "spec.source.pending.in" in problems_of(spec)
    spec["source"]["pending"] = {"column": "status", "in": ["a", 1]}
    assert "spec.source.pending.in" in problems_of(spec)
    spec["source"]["pending"] = {"column": "status", "equals": None}
    assert "spec.source.pending.equals" in problems_of(spec)


def test_unknown_fields_are_rejected_so_typos_do_not_pass_silently() -> None:
    spec = full_spec()
    spec["retry"]["maxAttempt"] = 3
    spec["surprise"] = {}
    problems = problems_of(spec)
    assert set(problems) == {"spec.retry.maxAttempt", "spec.surprise"}
    assert "unknown field" in problems["spec.retry.maxAttempt"]


def test_spec_must_be_a_mapping_and_needs_source_and_task() -> None:
    assert list(problems_of([])) == ["spec"]  # type: ignore[arg-type]
    assert set(problems_of({})) >= {"spec.source", "spec.task"}


def test_pod_selector_expressions() -> None:
    spec = full_spec()
    spec["workers"]["podSelector"] = {
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
    }
    parsed = parse(spec)
    assert parsed.workers.match_expressions == (
        policy.LabelSelectorRequirement(key="tier", operator="In", values=("a", "b")),
    )
    spec["workers"]["podSelector"]["matchExpressions"][0]["operator"] = "Like"
    assert "spec.workers.podSelector.matchExpressions[0].operator" in problems_of(spec)


@pytest.mark.parametrize(
    ("selector", "path"),
    [
        ({"matchLabels": {"app,tier": "x"}}, "spec.workers.podSelector.matchLabels['app,tier']"),
        ({"matchLabels": {"app": "a b"}}, "spec.workers.podSelector.matchLabels['app']"),
        ({"matchLabels": {"app": "x" * 64}}, "spec.workers.podSelector.matchLabels['app']"),
        (
            {"matchExpressions": [{"key": "app!=x,app", "operator": "Exists"}]},
            "spec.workers.podSelector.matchExpressions[0].key",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["ok", "(x)"]}]},
            "spec.workers.podSelector.matchExpressions[0].values[1]",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In"}]},
            "spec.workers.podSelector.matchExpressions[0].values",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
            "spec.workers.podSelector.matchExpressions[0].values",
        ),
    ],
)
def test_pod_selector_keys_and_values_follow_kubernetes_label_syntax(
    selector: dict[str, Any], path: str
) -> None:
    spec = full_spec()
    spec["workers"]["podSelector"] = selector
    assert path in problems_of(spec)


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        (("schedule", "sweepInterval"), "25h", "spec.schedule.sweepInterval"),
        (("retry", "initialDelay"), "169h", "spec.retry.initialDelay"),
        (("retry", "maxDelay"), "100000000h", "spec.retry.maxDelay"),
        (("lease", "timeout"), "169h", "spec.lease.timeout"),
        (("workers", "startTimeout"), "25h", "spec.workers.startTimeout"),
        (("workers", "startTimeout"), "0s", "spec.workers.startTimeout"),
        (("history", "retention"), "87601h", "spec.history.retention"),
        (("retry", "factor"), 101, "spec.retry.factor"),
        (("limits", "dispatchPerSecond"), 1e-300, "spec.limits.dispatchPerSecond"),
        (("limits", "dispatchPerSecond"), 1e300, "spec.limits.dispatchPerSecond"),
        (("limits", "maxInFlight"), 10**8, "spec.limits.maxInFlight"),
        (("lease", "timeout"), "\uff15m", "spec.lease.timeout"),  # a fullwidth digit
        (("task", "name"), "insights.task\n", "spec.task.name"),
        (("source", "table"), "journal_entry\n", "spec.source.table"),
    ],
)
def test_numbers_and_durations_are_bounded_so_arithmetic_stays_finite(
    field: tuple[str, str], value: Any, path: str
) -> None:
    spec = full_spec()
    spec.setdefault(field[0], {})[field[1]] = value
    assert path in problems_of(spec)


def test_start_timeout_defaults_to_three_minutes() -> None:
    assert parse(full_spec()).workers.start_timeout_seconds == 180.0
    spec = full_spec()
    spec["workers"]["startTimeout"] = "30s"
    assert parse(spec).workers.start_timeout_seconds == 30.0


def test_parsing_does_not_modify_the_spec() -> None:
    spec = full_spec()
    before = copy.deepcopy(spec)
    parse(spec)
    assert spec == before


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("2h45m30.5s", 9930.5),
        ("0", 0.0),
        ("-5m", -300.0),
        ("100us", 1e-4),
        ("10ns", 1e-8),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert policy.parse_duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 m", "m5", "1d", "5m-3s", "1h 30m", "--5m", "ms"])
def test_malformed_durations(text: str) -> None:
    with pytest.raises(policy.InvalidDuration):
        policy.parse_duration_seconds(text)


def test_history_retention_is_a_duration_of_at_least_a_minute() -> None:
    spec = full_spec()
    spec["history"] = {"retention": "720h"}
    assert parse(spec).history.retention_seconds == 720 * 3600
    spec["history"] = {"retention": "30s"}
    assert problems_of(spec) == {"spec.history.retention": "must be at least 1m"}
    spec["history"] = {"retention": "a week"}
    assert list(problems_of(spec)) == ["spec.history.retention"]


def test_broker_transport_options_name_the_apps_redis_keys_as_celery_spells_them() -> None:
    spec = full_spec()
    assert parse(spec).task.transport_options() == {}
    options = {
        "global_keyprefix": "app-one:",
        "unacked_key": "app_one_unacked",
        "unacked_index_key": "app_one_unacked_index",
        "sep": "\x06\x16",
        "priority_steps": [0, 5, 9],
    }
    spec["task"]["brokerTransportOptions"] = options
    assert parse(spec).task.transport_options() == options


def test_broker_transport_options_that_kombu_would_not_take_name_the_field() -> None:
    spec = full_spec()
    spec["task"]["brokerTransportOptions"] = {
        "unacked_key": "has space",
        "sep": "",
        "priority_steps": [3, 0],
        "visibility_timeout": 3600,
    }
    found = problems_of(spec)
    prefix = "spec.task.brokerTransportOptions"
    assert sorted(found) == sorted(
        f"{prefix}.{name}"
        for name in ("unacked_key", "sep", "priority_steps", "visibility_timeout")
    )
    assert "kombu's default is [0, 3, 6, 9]" in found[f"{prefix}.priority_steps"]
    assert "unknown field" in found[f"{prefix}.visibility_timeout"]
