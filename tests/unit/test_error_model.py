"""The sweep's error model, without I/O: which failure is which condition reason, which field
each message names, and that no text from a Secret is ever quoted."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from celery_reconciler import broker, conditions, kube, ledger, loop, planning, reconcile, source
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import problems


def source_of(**overrides: object) -> policy_module.Source:
    spec = {
        "table": "public.journal_entry",
        "idColumn": "id",
        "pending": {"column": "insights_extracted", "equals": False},
        "orderBy": "created_at",
        **overrides,
    }
    full = {"source": spec, "task": {"name": "tasks.extract"}}
    return policy_module.parse_policy(
        full, namespace="ns", name="p", require_secret_refs=False
    ).source


@pytest.mark.parametrize(
    ("sqlstate", "detail", "overrides", "field"),
    [
        ("42883", "operator does not exist: text = boolean", {}, "spec.source.pending.equals"),
        (
            "42883",
            "operator does not exist: boolean = integer",
            {"pending": {"column": "flag", "in": [1, 2]}},
            "spec.source.pending.in",
        ),
        ("22007", 'invalid input syntax for type timestamp: "x"', {}, "spec.source.pending"),
        (None, "PostgreSQL text fields cannot contain NUL (0x00) bytes", {}, "pending.equals"),
        (
            "42883",
            "could not identify an ordering operator for type json",
            {},
            "spec.source.orderBy",
        ),
        (
            "42883",
            "could not identify an ordering operator for type json",
            {"orderBy": "id"},
            "spec.source.idColumn",
        ),
        ("42703", "column src.insights_extracted does not exist", {}, "pending.column"),
        ("42703", "column src.created_at does not exist", {}, "spec.source.orderBy"),
        ("42P01", 'relation "public.journal_entry" does not exist', {}, "spec.source.table"),
        ("3F000", 'schema "nope" does not exist', {}, "spec.source.table"),
        ("42501", "permission denied for table journal_entry", {}, "GRANT SELECT"),
        ("57014", "canceling statement due to statement timeout", {}, "index the predicate"),
        ("42601", "syntax error at or near x", {}, "spec.source"),
    ],
)
def test_a_failed_query_on_the_users_table_names_the_field_to_fix(
    sqlstate: str | None, detail: str, overrides: dict[str, object], field: str
) -> None:
    message = source.invalid_source_message(
        sqlstate=sqlstate, detail=detail, source=source_of(**overrides)
    )
    assert message is not None
    assert field in message
    assert detail in message


def test_a_missing_column_names_only_the_fields_that_name_it() -> None:
    message = source.invalid_source_message(
        sqlstate="42703", detail="column src.created_at does not exist", source=source_of()
    )
    assert message is not None
    assert "spec.source.idColumn" not in message
    assert "spec.source.pending.column" not in message


@pytest.mark.parametrize("sqlstate", ["08006", "57P01", "53300", "XX000"])
def test_a_failed_server_is_not_the_specs_fault(sqlstate: str) -> None:
    assert (
        source.invalid_source_message(sqlstate=sqlstate, detail="gone", source=source_of()) is None
    )


DSN = "postgresql://app:pa55word-x@db.example:5432/journal"


def test_database_failures_are_classified_without_secrets() -> None:
    denied = ledger.database_failure(
        psycopg.errors.InsufficientPrivilege("permission denied for schema celery_reconciler"),
        dsn=DSN,
        doing="creating the ledger schema",
    )
    assert isinstance(denied, ledger.LedgerPermissionDenied)
    assert "GRANT" in str(denied) and "spec.source.databaseSecretRef" in str(denied)
    assert 'database "journal" on db.example:5432' in str(denied)

    for transient in (
        psycopg.OperationalError(f"connection to {DSN} failed"),
        psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.AdminShutdown("terminating connection"),
    ):
        failure = ledger.database_failure(transient, dsn=DSN, doing="claiming entries")
        assert isinstance(failure, ledger.DatabaseUnavailable)
        assert "pa55word-x" not in str(failure) and DSN not in str(failure)

    ours = psycopg.errors.SyntaxError("syntax error")  # a bug of ours: reported as such
    assert ledger.database_failure(ours, dsn=DSN, doing="x") is ours


@pytest.mark.parametrize(
    "value", ["hello s3cret world", "s3cretkey=value", "port='s3cret", "dbname='s3cret"]
)
def test_a_dsn_that_does_not_parse_is_never_quoted(value: str) -> None:
    with pytest.raises(ledger.DsnInvalid) as caught:
        ledger.check_dsn(value, where='the value of key "dsn" of secret "db"')
    message = str(caught.value)
    assert 'the value of key "dsn" of secret "db" is not a PostgreSQL DSN' in message
    assert "s3cret" not in message and "hello" not in message
    assert "s3cret" not in ledger.describe_dsn(value)


def test_a_dsn_shows_where_the_server_is_and_hides_every_odd_value() -> None:
    assert ledger.describe_dsn(DSN) == 'database "journal" on db.example:5432'
    odd = "host=db.example port=s3cretport dbname=journal sslmode=zq options='-c x=s3cret'"
    assert "s3cret" not in ledger.describe_dsn(odd)
    text = 'invalid integer value "s3cretport" for connection option "port"; sslmode "zq"'
    cleaned = ledger.sanitize_database_error(text, dsn=odd)
    assert "s3cret" not in cleaned and '"zq"' not in cleaned


def test_every_sweep_failure_has_its_reason_and_anything_else_is_an_internal_error() -> None:
    cases = [
        (kube.SecretNotFound("x"), conditions.SECRET_NOT_FOUND),
        (kube.SecretInvalid("x"), conditions.SECRET_INVALID),
        (ledger.DsnInvalid("x"), conditions.SECRET_INVALID),
        (broker.BrokerUrlInvalid("x"), conditions.SECRET_INVALID),
        (kube.KubernetesUnreachable("x"), conditions.KUBERNETES_UNAVAILABLE),
        (reconcile.DatabaseUnavailable("x"), conditions.DATABASE_UNAVAILABLE),
        (reconcile.LedgerPermissionDenied("x"), conditions.LEDGER_PERMISSION_DENIED),
        (reconcile.BrokerUnavailable("x"), conditions.BROKER_UNAVAILABLE),
        (reconcile.SourceInvalid("x"), conditions.SOURCE_INVALID),
        (ZeroDivisionError("boom"), conditions.INTERNAL_ERROR),
    ]
    for error, reason in cases:
        assert problems.problem_of(error).reason == reason
    internal = problems.problem_of(KeyError(f"cannot use {DSN}"), secrets=ledger.dsn_secrets(DSN))
    assert "KeyError" in internal.message and "bug" in internal.message
    assert "pa55word-x" not in internal.message


def test_a_tiny_dispatch_rate_ends_the_sweep_and_sweeps_again_when_it_allows() -> None:
    assert (
        planning.dispatch_pause_within_sweep(
            dispatched=1, elapsed_seconds=0.0, dispatch_per_second=1e-300
        )
        is None
    )
    assert (
        planning.dispatch_pause_within_sweep(
            dispatched=1, elapsed_seconds=0.0, dispatch_per_second=5e-324
        )
        is None
    )
    assert planning.dispatch_pause_within_sweep(
        dispatched=4, elapsed_seconds=1.0, dispatch_per_second=2.0
    ) == pytest.approx(1.0)
    assert (
        planning.next_wakeup_seconds(
            sweep_interval_seconds=300.0,
            earliest_retry_in_seconds=None,
            rate_allows_in_seconds=10.0,
            random=lambda: 0.5,
        )
        == 10.0
    )
    assert (
        planning.next_wakeup_seconds(
            sweep_interval_seconds=300.0,
            earliest_retry_in_seconds=None,
            rate_allows_in_seconds=float("inf"),
            random=lambda: 1.0,
        )
        == 300.0
    )


@pytest.mark.parametrize(
    ("rate", "expected"), [(0.0, 500), (1e-300, 1), (2.5, 2), (1e308, 500), (5000.0, 500)]
)
def test_a_dispatch_page_is_about_a_seconds_worth(rate: float, expected: int) -> None:
    assert planning.dispatch_batch_size(batch_size=500, dispatch_per_second=rate) == expected


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"lease": {"timeout": "9999999999h"}}, "spec.lease.timeout"),
        ({"retry": {"maxDelay": "9000h"}}, "spec.retry.maxDelay"),
        ({"schedule": {"sweepInterval": "99999999999999999999m"}}, "sweepInterval"),
    ],
)
def test_durations_beyond_their_bounds_are_refused_naming_the_field(
    section: dict[str, object], field: str
) -> None:
    spec: dict[str, object] = {
        "source": {"table": "t", "pending": {"column": "c", "isNull": True}},
        "task": {"name": "tasks.x"},
        **section,
    }
    with pytest.raises(policy_module.InvalidPolicy) as caught:
        policy_module.parse_policy(spec, namespace="n", name="p", require_secret_refs=False)
    assert field in str(caught.value)


def test_the_operations_guide_lists_exactly_the_reasons_a_policy_can_be_degraded_with() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| False \| True \| `(\w+)` \|", guide, flags=re.MULTILINE))
    in_code = {reason for _, reason in problems.SWEEP_ERRORS}
    in_code |= {conditions.INVALID_SPEC, conditions.INTERNAL_ERROR}
    # Reasons a sweep that worked can still carry (the loop's health checks).
    in_code |= {conditions.CONFLICT, conditions.OWNER_ROW_DISAGREES, *problems.HEALTH_REASONS}
    assert documented == in_code


def test_an_unexpected_error_logs_its_traceback_once_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy_loop = loop.PolicyLoop(namespace="n", name="p", uid="u", body={})
    policy_loop.connections.dsn = DSN

    def fail() -> None:
        raise KeyError(f"no such thing in {DSN}")

    for _ in range(3):
        try:
            fail()
        except KeyError as error:
            problem = policy_loop.errors.problem_of(error)
    assert problem.reason == conditions.INTERNAL_ERROR
    tracebacks = [r for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1
    assert "in fail" in tracebacks[0].getMessage()
    assert "pa55word-x" not in caplog.text and "pa55word-x" not in problem.message


def test_a_slow_rate_is_kept_across_sweeps_and_a_new_rate_starts_afresh() -> None:
    pacing = planning.RatePacing()
    assert not pacing.holds(dispatch_per_second=0.1, now=0.0)
    pacing.swept(rate_allows_in_seconds=10.0, now=0.0)
    assert pacing.holds(dispatch_per_second=0.1, now=9.9)
    assert pacing.allows_in_seconds(now=4.0) == 6.0
    assert not pacing.holds(dispatch_per_second=0.1, now=10.0)
    pacing.swept(rate_allows_in_seconds=1e300, now=10.0)
    assert pacing.holds(dispatch_per_second=0.1, now=1e9)
    assert not pacing.holds(dispatch_per_second=2.0, now=1e9)  # edited: starts afresh
    pacing.swept(rate_allows_in_seconds=None, now=1e9)
    assert pacing.allows_in_seconds(now=1e9) is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret@db:5432/journal",  # a DSN in the broker's Secret
        "s3cret",
        "http://app:s3cret@broker:80/",
        "redis://app:s3cret@broker:notaport/0",
    ],
)
def test_a_broker_secret_that_holds_no_broker_url_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(broker.BrokerUrlInvalid) as caught:
        broker.check_broker_url(url, where="the broker Secret")
    assert "the broker Secret" in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["redis://:s3cret@broker:6379/0", "rediss://broker:6380/0", "amqp://u:s3cret@mq//"]
)
def test_broker_urls_kombu_knows_pass_the_check(url: str) -> None:
    broker.check_broker_url(url, where="the broker Secret")
