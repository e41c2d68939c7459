"""The CLI's pure helpers: the status table, ages, ``--ids`` and the explain story."""

from __future__ import annotations

import datetime
import uuid

import pytest

from celery_reconciler import cli, ledger

NOW = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def policy(namespace: str, name: str, **ready: str) -> dict[str, object]:
    conditions = [{"type": "Ready", **ready}, {"type": "Degraded", "status": "False"}]
    return {
        "metadata": {"namespace": namespace, "name": name},
        "status": {"conditions": conditions} if ready else {},
    }


def status(namespace: str, name: str, **counts: object) -> dict[str, object]:
    return {"metadata": {"namespace": namespace, "name": name}, "status": counts}


def test_status_rows_join_policies_with_their_status_and_keep_policies_without_one() -> None:
    rows = cli.status_rows(
        [
            policy("b", "insights", status="True", reason="Swept"),
            policy("a", "fresh"),
            policy("a", "broken", status="False", reason="DatabaseUnavailable"),
        ],
        [
            status("b", "insights", pending=3, inFlight=2, retrying=1, succeeded=7, dead=0),
            status("a", "broken", pending=9, oldestPendingSeconds=61),
            status("c", "orphan", pending=1),
        ],
    )
    assert [(r.namespace, r.policy) for r in rows] == [
        ("a", "broken"),
        ("a", "fresh"),
        ("b", "insights"),
    ]
    broken, fresh, insights = rows
    assert (broken.pending, broken.oldest_pending_seconds, broken.reason) == (
        9,
        61,
        "DatabaseUnavailable",
    )
    assert fresh == cli.StatusRow(namespace="a", policy="fresh")
    assert insights.as_json() == {
        "namespace": "b",
        "policy": "insights",
        "pending": 3,
        "inFlight": 2,
        "retrying": 1,
        "succeeded": 7,
        "dead": 0,
        "oldestPendingSeconds": None,
        "lastSweepTime": None,
        "ready": "True",
        "reason": "Swept",
    }


def test_status_table_has_kubectl_columns_and_a_namespace_column_only_across_namespaces() -> None:
    rows = [
        cli.StatusRow(
            namespace="mindjourney",
            policy="journal-insights",
            pending=12,
            in_flight=3,
            retrying=1,
            succeeded=480,
            dead=2,
            oldest_pending_seconds=75,
            last_sweep_time="2030-01-02T03:03:55Z",
            ready="True",
            reason="Swept",
        ),
        cli.StatusRow(namespace="other", policy="new"),
    ]
    table = cli.format_status_table(rows, all_namespaces=True, now=NOW).splitlines()
    assert table[0].split() == ["NAMESPACE", *cli.STATUS_HEADER]
    assert table[1].split() == [
        "mindjourney",
        "journal-insights",
        "12",
        "3",
        "1",
        "480",
        "2",
        "75s",
        "10s",
        "True",
        "Swept",
    ]
    assert table[2].split() == ["other", "new", *["-"] * 9]
    # Columns line up: every cell starts where its header starts.
    assert table[1].index("12") == table[0].index("PENDING")

    single = cli.format_status_table(rows[:1], all_namespaces=False, now=NOW).splitlines()
    assert single[0].split() == list(cli.STATUS_HEADER)
    assert single[1].split()[0] == "journal-insights"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-3, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (303, "5m3s"),
        (42 * 60 + 7, "42m"),
        (3 * 3600 + 5 * 60, "3h5m"),
        (5 * 3600, "5h"),
        (20 * 3600 + 59, "20h"),
        (4 * 86400 + 1, "4d"),
    ],
)
def test_human_duration_writes_ages_like_kubectl(seconds: float | None, text: str) -> None:
    assert cli.human_duration(seconds) == text


def test_age_of_a_missing_or_malformed_timestamp_is_a_dash() -> None:
    assert cli.age(None, now=NOW) == "-"
    assert cli.age("yesterday", now=NOW) == "-"
    assert cli.age("2030-01-02T02:04:05Z", now=NOW) == "60m"


def test_entry_ids_are_comma_separated_and_never_empty() -> None:
    assert cli.parse_entry_ids("1, 2,abc-3") == ["1", "2", "abc-3"]
    for bad in ("", "1,,2", "1,", " "):
        with pytest.raises(cli.UsageError, match="comma-separated entry ids"):
            cli.parse_entry_ids(bad)


def at(seconds: float) -> datetime.datetime:
    return NOW + datetime.timedelta(seconds=seconds)


def a_history() -> ledger.EntryHistory:
    first, second = uuid.UUID(int=1), uuid.UUID(int=2)
    return ledger.EntryHistory(
        policy_key="mindjourney/journal-insights",
        entry_id="42",
        state="dead",
        attempt=2,
        fence_token=second,
        lease_deadline=None,
        next_attempt_at=None,
        worker="insights-worker-b",
        last_error="RuntimeError: boom\nsecond line",
        created_at=at(0),
        updated_at=at(9),
        attempts=(
            ledger.AttemptRecord(
                attempt=1,
                fence_token=first,
                worker="insights-worker-a",
                outcome="failed",
                error="RuntimeError: boom",
                dispatched_at=at(0),
                started_at=at(0.25),
                finished_at=at(1.5),
                retry_at=at(3),
            ),
            ledger.AttemptRecord(
                attempt=2,
                fence_token=second,
                worker="insights-worker-b",
                outcome="failed",
                error="RuntimeError: boom",
                dispatched_at=at(3),
                started_at=at(3.5),
                finished_at=at(4),
                retry_at=None,
            ),
        ),
    )


def test_explain_tells_each_attempt_with_its_fence_worker_outcome_and_times() -> None:
    text = cli.format_history(a_history())
    assert text.startswith("entry 42 of policy mindjourney/journal-insights\n")
    assert "state:         dead (attempts used: 2)" in text
    assert "attempt 1: failed (1.250s)" in text
    assert f"fence token:   {uuid.UUID(int=1)}" in text
    assert "worker:        insights-worker-a" in text
    assert "retry due:     2030-01-02T03:04:08.000Z" in text
    assert "started:       2030-01-02T03:04:05.250Z" in text
    # A multi-line error stays under its label.
    assert "last error:    RuntimeError: boom\n" + " " * 17 + "second line" in text


def test_explain_json_has_plain_values() -> None:
    document = cli.history_as_json(a_history())
    assert document["state"] == "dead"
    assert document["fence_token"] == str(uuid.UUID(int=2))
    assert document["created_at"] == "2030-01-02T03:04:05.000Z"
    assert [a["outcome"] for a in document["attempts"]] == ["failed", "failed"]
    assert document["attempts"][0]["retry_at"] == "2030-01-02T03:04:08.000Z"
    assert document["attempts"][1]["retry_at"] is None


def test_render_table_pads_columns_three_spaces_apart() -> None:
    assert cli.render_table(("A", "BB"), [("xyz", "1")]) == "A     BB\nxyz   1\n"
