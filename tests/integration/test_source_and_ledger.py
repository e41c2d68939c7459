"""The source reader and the ledger against real PostgreSQL: index use, id types, races.

The EXPLAIN test is the proof of "cost follows the backlog": on a table of many processed
rows and few pending ones, the pending page is read through the partial index on pending
rows, never by scanning the table.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from celery_app.demo import schema
from celery_reconciler import conditions, ledger, planning, policy, sharding, source

pytestmark = pytest.mark.integration


def plan_of(conn: psycopg.Connection[Any], query: sql.Composed, params: list[Any]) -> str:
    rows = conn.execute(sql.SQL("EXPLAIN ") + query, params).fetchall()
    return "\n".join(row[0] for row in rows)


def demo_source() -> policy.Source:
    spec = schema.policy_spec()
    return policy.parse_policy(spec, namespace="t", name="p").source


def test_pending_pages_use_the_partial_index_when_most_rows_are_processed(
    conn: psycopg.Connection[Any],
) -> None:
    schema.seed(conn, count=100, processed=200_000)
    conn.execute("ANALYZE journal_entry")
    src = demo_source()

    first_page = source.pending_page(conn, src, after=None, limit=40)
    next_page = source.pending_page(conn, src, after=first_page[-1].key, limit=40)
    assert len(first_page) == 40 and len(next_page) == 40
    assert not {row.entry_id for row in first_page} & {row.entry_id for row in next_page}

    for plan in (
        plan_of(conn, source.page_query(src, after=False), [40]),
        plan_of(conn, source.page_query(src, after=True), [*first_page[-1].key, 40]),
    ):
        assert "journal_entry_pending" in plan, plan
        assert "Seq Scan" not in plan, plan

    # Measured, not just planned: the page touches a handful of buffers, not the table.
    rows = conn.execute(
        sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + source.page_query(src, after=False),
        [40],
    ).fetchone()
    assert rows is not None
    plan = rows[0][0]
    table_pages = conn.execute(
        "SELECT relpages FROM pg_class WHERE relname = 'journal_entry'"
    ).fetchone()
    assert table_pages is not None
    buffers = plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]
    assert buffers < table_pages[0] / 20, (buffers, table_pages[0])


def test_uuid_ids_in_a_mixed_case_schema_with_a_status_set(conn: psycopg.Connection[Any]) -> None:
    conn.execute('CREATE SCHEMA "Tracking"')
    conn.execute(
        'CREATE TABLE "Tracking"."WorkItem" ("Id" uuid PRIMARY KEY, "Status" text NOT NULL)'
    )
    ids = sorted(uuid.uuid4() for _ in range(25))
    statuses = ["new", "failed", "done", "new", "running"] * 5
    with conn.cursor() as cursor:
        cursor.executemany(
            'INSERT INTO "Tracking"."WorkItem" VALUES (%s, %s)',
            list(zip(ids, statuses, strict=True)),
        )
    src = policy.parse_policy(
        {
            "source": {
                "table": "Tracking.WorkItem",
                "idColumn": "Id",
                "pending": {"column": "Status", "in": ["new", "failed"]},
            },
            "task": {"name": "t.process"},
        },
        namespace="t",
        name="p",
        require_secret_refs=False,
    ).source
    pending = [
        str(i) for i, status in zip(ids, statuses, strict=True) if status in ("new", "failed")
    ]

    seen: list[str] = []
    after = None
    while page := source.pending_page(conn, src, after=after, limit=4):
        seen.extend(row.entry_id for row in page)
        after = page[-1].key
    assert seen == pending  # keyset order by id, every pending id exactly once

    assert source.filter_pending(conn, src, [pending[0], str(ids[2]), "not-there"]) == {pending[0]}
    assert source.pending_summary(conn, src).count == len(pending)


def test_text_ids_with_awkward_characters_and_an_is_null_predicate(
    conn: psycopg.Connection[Any],
) -> None:
    conn.execute(
        "CREATE TABLE docs (key text PRIMARY KEY, processed_at timestamp, created timestamp "
        "NOT NULL DEFAULT localtimestamp)"
    )
    awkward = ['a"b', "c,d", "e\\f", "{g}", "h i", "NULL", "j'k"]
    with conn.cursor() as cursor:
        cursor.executemany("INSERT INTO docs (key) VALUES (%s)", [[key] for key in awkward])
    conn.execute("INSERT INTO docs (key, processed_at) VALUES ('done', localtimestamp)")
    src = policy.parse_policy(
        {
            "source": {
                "table": "docs",
                "idColumn": "key",
                "pending": {"column": "processed_at", "isNull": True},
                "orderBy": "created",
            },
            "task": {"name": "t.process"},
        },
        namespace="t",
        name="p",
        require_secret_refs=False,
    ).source
    page = source.pending_page(conn, src, after=None, limit=100)
    assert sorted(row.entry_id for row in page) == sorted(awkward)
    assert source.filter_pending(conn, src, [*awkward, "done"]) == set(awkward)
    summary = source.pending_summary(conn, src)
    assert summary.count == len(awkward)
    assert summary.oldest_seconds is not None and 0 <= summary.oldest_seconds < 60


def test_a_policy_that_does_not_fit_the_table_is_a_clear_error(
    conn: psycopg.Connection[Any],
) -> None:
    spec = schema.policy_spec()
    spec["source"]["table"] = "journal_entries"
    missing_table = policy.parse_policy(spec, namespace="t", name="p").source
    with pytest.raises(
        source.SourceInvalid, match=r"journal_entries does not exist .* — fix spec\.source\.table"
    ):
        source.pending_page(conn, missing_table, after=None, limit=10)
    spec = schema.policy_spec()
    spec["source"]["pending"] = {"column": "insights_done", "equals": False}
    missing_column = policy.parse_policy(spec, namespace="t", name="p").source
    with pytest.raises(source.SourceInvalid, match=r"spec\.source\.pending\.column"):
        source.pending_page(conn, missing_column, after=None, limit=10)


def test_schema_creation_is_idempotent_under_concurrency(demo_dsn: str) -> None:
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with psycopg.connect(demo_dsn, autocommit=True) as own:
                ledger.ensure_schema(own)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(demo_dsn, autocommit=True) as conn:
        assert ledger.ensure_schema(conn) == ledger.SCHEMA_VERSION
        versions = conn.execute(
            "SELECT version FROM celery_reconciler.schema_migrations ORDER BY version"
        ).fetchall()
        assert versions == [(v,) for v in range(1, ledger.SCHEMA_VERSION + 1)]


def test_concurrent_claims_never_hand_out_the_same_entry(demo_dsn: str) -> None:
    with psycopg.connect(demo_dsn, autocommit=True) as setup:
        ledger.ensure_schema(setup)
    ids = [str(n) for n in range(1, 101)]
    claims: dict[str, list[ledger.Claim]] = {}
    first_claimed = threading.Event()
    release_first = threading.Event()

    def claim(name: str, *, hold: bool) -> None:
        with psycopg.connect(demo_dsn, autocommit=True) as own, own.transaction():
            claims[name] = ledger.claim(
                own,
                policy_key="t/p",
                entry_ids=ids,
                lease_seconds=60,
                still_pending=lambda candidates: set(candidates),
            )
            if hold:
                first_claimed.set()
                release_first.wait(10)

    first = threading.Thread(target=claim, args=("first",), kwargs={"hold": True})
    first.start()
    assert first_claimed.wait(10)
    second = threading.Thread(target=claim, args=("second",), kwargs={"hold": False})
    second.start()
    second.join(0.5)
    release_first.set()  # the second claim waits on the first's uncommitted new rows
    first.join()
    second.join()
    assert len(claims["first"]) == 100
    assert claims["second"] == []
    with psycopg.connect(demo_dsn, autocommit=True) as conn:
        tokens = conn.execute(
            "SELECT count(DISTINCT fence_token) FROM celery_reconciler.entries"
        ).fetchone()
        assert tokens == (100,)


def test_a_page_of_new_and_known_entries_is_claimed_in_its_order(
    conn: psycopg.Connection[Any],
) -> None:
    ledger.ensure_schema(conn)
    with conn.transaction():
        known = ledger.claim(
            conn,
            policy_key="t/p",
            entry_ids=["2", "4"],
            lease_seconds=60,
            still_pending=lambda candidates: set(candidates),
        )
    conn.execute(  # entry 2's message was lost: its lease ran out while queued
        "UPDATE celery_reconciler.entries SET lease_deadline = now() WHERE entry_id = '2'"
    )
    with conn.transaction():
        page = ledger.claim(
            conn,
            policy_key="t/p",
            entry_ids=["1", "2", "3", "4", "5"],
            lease_seconds=60,
            still_pending=lambda candidates: set(candidates),
        )
    assert [(c.entry_id, c.again) for c in page] == [
        ("1", False),
        ("2", True),  # claimed again under a new fence
        ("3", False),
        ("5", False),  # 4 is queued under a live lease: not claimable
    ]
    assert page[1].fence_token != known[0].fence_token
    assert claim_pending_again(conn, "3") == []  # each entry once
    tokens = conn.execute(
        "SELECT entry_id, fence_token FROM celery_reconciler.entries ORDER BY entry_id"
    ).fetchall()
    assert tokens == [
        ("1", page[0].fence_token),
        ("2", page[1].fence_token),
        ("3", page[2].fence_token),
        ("4", known[1].fence_token),
        ("5", page[3].fence_token),
    ]


def claim_demo_page(
    conn: psycopg.Connection[Any],
    *,
    after: tuple[Any, ...] | None,
    size: int,
    sweeper: sharding.Fence | None = None,
) -> ledger.ClaimedPage:
    src = demo_source()
    return ledger.claim_page(
        conn,
        policy_key="t/p",
        page_query=source.page_query_text(conn, src, after=after is not None),
        page_params=[*(after or ()), size],
        key_width=source.key_width(src),
        lease_seconds=60,
        still_pending=lambda candidates: set(candidates),
        sweeper=sweeper,
    )


def test_a_page_is_read_and_claimed_by_one_statement_in_keyset_order(
    conn: psycopg.Connection[Any],
) -> None:
    ledger.ensure_schema(conn)
    schema.seed(conn, count=7)
    ids = [
        row[0] for row in conn.execute("SELECT id::text FROM journal_entry ORDER BY created_at, id")
    ]
    with conn.transaction():
        known = ledger.claim(
            conn,
            policy_key="t/p",
            entry_ids=[ids[1], ids[3]],
            lease_seconds=60,
            still_pending=lambda candidates: set(candidates),
        )
    conn.execute(  # the second entry's message was lost: its lease ran out while queued
        "UPDATE celery_reconciler.entries SET lease_deadline = now() WHERE entry_id = %s",
        [ids[1]],
    )
    first = claim_demo_page(conn, after=None, size=5)
    assert [(c.entry_id, c.again) for c in first.claims] == [
        (ids[0], False),
        (ids[1], True),  # claimed again under a new fence
        (ids[2], False),
        (ids[4], False),  # the fourth is queued under a live lease: not claimable
    ]
    assert first.claims[1].fence_token != known[0].fence_token
    assert first.size == 5
    second = claim_demo_page(conn, after=first.last_key, size=5)
    assert [c.entry_id for c in second.claims] == ids[5:]
    assert second.size == 2
    assert claim_demo_page(conn, after=None, size=10).claims == []  # each entry once
    tokens = dict(conn.execute("SELECT entry_id, fence_token FROM celery_reconciler.entries"))
    claims = [*first.claims, *second.claims]
    assert tokens == {
        ids[3]: known[1].fence_token,
        **{claim.entry_id: claim.fence_token for claim in claims},
    }


def test_a_page_claimed_by_a_replica_that_lost_the_policy_claims_nothing(
    conn: psycopg.Connection[Any],
) -> None:
    ledger.ensure_schema(conn)
    schema.seed(conn, count=3)
    ledger.begin_sweep(conn, sharding.Fence("t/p", "replica-b/1", 8))
    with pytest.raises(ledger.FencedOut):
        claim_demo_page(conn, after=None, size=5, sweeper=sharding.Fence("t/p", "replica-a/1", 7))
    assert conn.execute("SELECT count(*) FROM celery_reconciler.entries").fetchone() == (0,)
    owner = sharding.Fence("t/p", "replica-b/1", 8)
    first = claim_demo_page(conn, after=None, size=5, sweeper=owner)
    assert len(first.claims) == 3
    # An empty page claims nothing and checks no fence: an idle sweep locks no row.
    lost = sharding.Fence("t/p", "replica-a/1", 7)
    assert claim_demo_page(conn, after=first.last_key, size=5, sweeper=lost).size == 0


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["1", "22"],
        ['quote"s', "back\\slash", "com,ma", "{braces}", " spaced ", "", "NULL", "ünï ✓"],
    ],
)
def test_a_text_array_literal_reads_back_as_the_same_ids(
    conn: psycopg.Connection[Any], values: list[str]
) -> None:
    row = conn.execute("SELECT %s::text[]", [source.id_array_literal(values)]).fetchone()
    assert row == (values,)


def claim_pending_again(conn: psycopg.Connection[Any], entry_id: str) -> list[ledger.Claim]:
    """Claim one entry of policy t/p the way a sweep does when the source shows it pending."""
    with conn.transaction():
        return ledger.claim(
            conn,
            policy_key="t/p",
            entry_ids=[entry_id],
            lease_seconds=60,
            still_pending=lambda candidates: set(candidates),
        )


def claimed_and_started(
    conn: psycopg.Connection[Any], entry_ids: list[str]
) -> dict[str, ledger.RunningAttempt]:
    """Claim the entries under policy t/p and start each under one live incarnation."""
    ledger.ensure_schema(conn)
    # The policy's rules, as every sweep publishes them (its survey's first part).
    ledger.survey(
        conn,
        policy.parse_policy(schema.policy_spec(), namespace="t", name="p"),
        stranded_seconds=0.0,
    )
    with conn.transaction():
        claims = ledger.claim(
            conn,
            policy_key="t/p",
            entry_ids=entry_ids,
            lease_seconds=60,
            still_pending=lambda candidates: set(candidates),
        )
    incarnation = ledger.register_incarnation(
        conn,
        identity=ledger.WorkerIdentity(hostname="test", pid=1),
        heartbeat_timeout_seconds=20,
    )
    started = {}
    for claimed in claims:
        attempt = ledger.start_attempt(
            conn,
            fence_token=str(claimed.fence_token),
            entry_id=claimed.entry_id,
            worker="test",
            incarnation=incarnation,
            heartbeat_timeout_seconds=20,
        )
        assert attempt is not None
        started[claimed.entry_id] = attempt
    return started


def outcomes(conn: psycopg.Connection[Any], entry_id: str) -> list[tuple[int, str]]:
    history = ledger.history(conn, policy_key="t/p", entry_id=entry_id)
    assert history is not None
    return [(attempt.attempt, attempt.outcome) for attempt in history.attempts]


def test_each_attempt_has_one_history_row_written_when_it_ends(
    conn: psycopg.Connection[Any],
) -> None:
    started = claimed_and_started(conn, ["1", "2", "3"])
    # A running attempt is shown from the entry row; its history row comes when it ends.
    assert outcomes(conn, "1") == [(1, "running")]
    assert ledger.record_success(conn, fence_token=started["1"].fence_token)
    assert not ledger.record_success(conn, fence_token=started["1"].fence_token)
    assert (
        ledger.record_failure(
            conn, fence_token=started["2"].fence_token, error="Boom", retry_in_seconds=60
        )
        == "retry_wait"
    )
    assert outcomes(conn, "1") == [(1, "succeeded")]
    assert outcomes(conn, "2") == [(1, "failed")]
    assert outcomes(conn, "3") == [(1, "running")]
    rows = conn.execute(
        "SELECT entry_id, count(*) FROM celery_reconciler.attempts GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [("1", 1), ("2", 1)]


def test_a_running_history_row_of_the_previous_schema_is_completed_not_duplicated(
    conn: psycopg.Connection[Any],
) -> None:
    started = claimed_and_started(conn, ["1", "2"])
    # Workers of the previous schema wrote the history row when the attempt started.
    conn.execute(
        """
        INSERT INTO celery_reconciler.attempts (policy_key, entry_id, attempt, fence_token,
            worker, outcome, dispatched_at, started_at)
        SELECT policy_key, entry_id, attempt, fence_token, worker, 'running', dispatched_at,
            started_at
        FROM celery_reconciler.entries
        """
    )
    assert ledger.record_success(conn, fence_token=started["1"].fence_token)
    assert ledger.heartbeat(
        conn,
        incarnation=conn.execute("SELECT id FROM celery_reconciler.incarnations").fetchone()[0],
        finished=[started["2"].fence_token],
    )
    assert outcomes(conn, "1") == [(1, "succeeded")]
    assert outcomes(conn, "2") == [(1, "succeeded")]
    assert conn.execute("SELECT count(*) FROM celery_reconciler.attempts").fetchone() == (2,)


def test_index_advice_names_an_index_that_postgres_then_uses(
    conn: psycopg.Connection[Any],
) -> None:
    """Without the partial index the pending page reads the whole table: the advice names
    the index to create. Running exactly the advised statement makes the advice go away."""
    schema.seed(conn, count=20_000)
    conn.execute("UPDATE journal_entry SET insights_extracted = true WHERE id % 100 <> 0")
    conn.execute("DROP INDEX journal_entry_pending")
    conn.execute("VACUUM ANALYZE journal_entry")
    source_ = demo_source()
    advice = source.index_advice(conn, source_, page_size=500)
    assert advice is not None
    assert advice.table_rows >= 19_000
    assert advice.create_index == (
        'CREATE INDEX CONCURRENTLY ON "public"."journal_entry" ("created_at", "id") '
        'WHERE "insights_extracted" = false'
    )
    conn.execute(advice.create_index)
    conn.execute("ANALYZE journal_entry")
    assert source.index_advice(conn, source_, page_size=500) is None


def succeeded_rows(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM celery_reconciler.entries WHERE state = 'succeeded'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_succeeded_count_follows_every_transition_without_counting_history(
    conn: psycopg.Connection[Any],
) -> None:
    """Successes are folded into a tally; a succeeded entry claimed again (pending again)
    leaves it. At every step the count equals the succeeded rows — read from the unfinished
    rows, the tally and the successes not folded yet, never by counting succeeded rows."""
    started = claimed_and_started(conn, [str(n) for n in range(1, 11)])
    for entry_id in ("1", "2", "3"):
        assert ledger.record_success(conn, fence_token=started[entry_id].fence_token)
    assert ledger.counts(conn, policy_key="t/p").succeeded == 3 == succeeded_rows(conn)
    assert ledger.fold_successes(conn, policy_key="t/p") == 3
    assert ledger.fold_successes(conn, policy_key="t/p") == 0
    assert ledger.counts(conn, policy_key="t/p").succeeded == 3
    # Entry 1 is pending again (its predicate holds once more): claimed, out of the tally.
    again = claim_pending_again(conn, "1")
    assert [claim.again for claim in again] == [True]
    assert ledger.counts(conn, policy_key="t/p").succeeded == 2 == succeeded_rows(conn)
    assert ledger.heartbeat(
        conn,
        incarnation=conn.execute("SELECT id FROM celery_reconciler.incarnations").fetchone()[0],
        finished=[started["4"].fence_token, started["5"].fence_token],
    )
    assert ledger.counts(conn, policy_key="t/p").succeeded == 4 == succeeded_rows(conn)
    assert ledger.fold_successes(conn, policy_key="t/p", limit=1) == 1  # bounded batches
    assert ledger.counts(conn, policy_key="t/p").succeeded == 4
    assert ledger.fold_successes(conn, policy_key="t/p") == 1
    assert ledger.counts(conn, policy_key="t/p").succeeded == 4


def test_retention_prunes_old_history_in_batches_and_keeps_the_count(
    conn: psycopg.Connection[Any],
) -> None:
    started = claimed_and_started(conn, [str(n) for n in range(1, 31)])
    for attempt in started.values():
        assert ledger.record_success(conn, fence_token=attempt.fence_token)
    # Twenty of them finished ten days ago; the rest just now.
    conn.execute(
        "UPDATE celery_reconciler.entries SET finished_at = now() - interval '10 days' "
        "WHERE entry_id::int <= 20"
    )
    conn.execute(
        "UPDATE celery_reconciler.attempts SET finished_at = now() - interval '10 days' "
        "WHERE entry_id::int <= 20"
    )
    week = 7 * 24 * 3600.0
    # Successes not folded into the tally yet are never pruned: the count would lose them.
    assert ledger.prune(conn, policy_key="t/p", retention_seconds=week, limit=15) == (
        ledger.Pruned(attempts=15, entries=0)
    )
    assert ledger.fold_successes(conn, policy_key="t/p") == 30
    second = ledger.prune(conn, policy_key="t/p", retention_seconds=week, limit=15)
    third = ledger.prune(conn, policy_key="t/p", retention_seconds=week, limit=15)
    assert (second, third) == (
        ledger.Pruned(attempts=5, entries=15),
        ledger.Pruned(attempts=0, entries=5),
    )
    assert ledger.prune(conn, policy_key="t/p", retention_seconds=week) == ledger.Pruned(0, 0)
    assert succeeded_rows(conn) == 10
    assert conn.execute("SELECT count(*) FROM celery_reconciler.attempts").fetchone() == (10,)
    assert ledger.counts(conn, policy_key="t/p").succeeded == 30
    # A pruned entry that is pending again is simply claimed anew.
    anew = claim_pending_again(conn, "1")
    assert [(claim.entry_id, claim.again) for claim in anew] == [("1", False)]


def test_silence_ends_only_workers_outside_kubernetes_and_pod_proof_ends_the_rest(
    conn: psycopg.Connection[Any],
) -> None:
    """Three processes, all holding an attempt: one outside Kubernetes and one in a Pod
    fall silent, one in the same Pod's new container instance lives. Silence ends only the
    first; the second waits for its Pod's word, which a listing gives at once."""
    ledger.ensure_schema(conn)
    # The policy's rules, as every sweep publishes them (its survey's first part).
    ledger.survey(
        conn,
        policy.parse_policy(schema.policy_spec(), namespace="t", name="p"),
        stranded_seconds=0.0,
    )
    with conn.transaction():
        claims = ledger.claim(
            conn,
            policy_key="t/p",
            entry_ids=["1", "2", "3"],
            lease_seconds=60,
            still_pending=lambda candidates: set(candidates),
        )
    old, new = "a" * 64, "b" * 64
    identities = {
        "1": ledger.WorkerIdentity(hostname="outside", pid=1),
        "2": ledger.WorkerIdentity(
            hostname="w-1", pid=2, pod_name="w-1", pod_namespace="t", pod_uid="u1",
            container_id=old,
        ),
        "3": ledger.WorkerIdentity(
            hostname="w-1", pid=3, pod_name="w-1", pod_namespace="t", pod_uid="u1",
            container_id=new,
        ),
    }  # fmt: skip
    holders = {}
    for claimed in claims:
        holders[claimed.entry_id] = ledger.register_incarnation(
            conn, identity=identities[claimed.entry_id], heartbeat_timeout_seconds=5
        )
        assert ledger.start_attempt(
            conn,
            fence_token=str(claimed.fence_token),
            entry_id=claimed.entry_id,
            worker="w",
            incarnation=holders[claimed.entry_id],
            heartbeat_timeout_seconds=5,
        )
    conn.execute(  # silent for twice their timeout
        "UPDATE celery_reconciler.incarnations SET heartbeat_at = now() - interval '10 s' "
        "WHERE id = ANY(%s)",
        [[holders["1"], holders["2"]]],
    )

    assert ledger.end_silent_incarnations(conn) == 1
    silent = ledger.silent_pod_incarnations(conn, policy_key="t/p")
    assert [found.incarnation.id for found in silent] == [str(holders["2"])]
    assert silent[0].incarnation.container_id == old and silent[0].pod_name == "w-1"

    # The operator's first sight of the pod: the kubelet reports the old instance ended.
    ending = planning.pod_ending(
        pod_uid="u1",
        old=None,
        new=[
            planning.ContainerStatus(
                name="worker",
                restart_count=1,
                container_id=new,
                started_at=datetime.datetime.now(datetime.UTC),
                ended_ids=(old,),
            )
        ],
        deleted=False,
        phase="Running",
    )
    assert ending is not None
    assert ledger.end_pod_incarnations(conn, ending=ending) == 1
    assert sorted(ledger.expire_leases(conn, policy_key="t/p").retry_ids) == ["1", "2"]
    reasons = dict(
        conn.execute("SELECT pid, ended_reason FROM celery_reconciler.incarnations").fetchall()
    )
    assert reasons[1].startswith("no heartbeat") and reasons[3] is None
    assert reasons[2].startswith("its container worker's instance aaaaaaaaaaaa ended")


def attempts_rows_read(conn: psycopg.Connection[Any]) -> int:
    """Rows of the attempts table this transaction has read so far: by sequential scans and
    fetched through indexes (the outcomes read needs each row's outcome, so no index-only
    scan can answer it)."""
    row = conn.execute(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
        "WHERE schemaname = 'celery_reconciler' AND relname = 'attempts'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_first_status_read_after_a_start_reads_the_tally_not_the_history(
    conn: psycopg.Connection[Any],
) -> None:
    """An operator that starts over a long history must not scan it: the first status read
    counts succeeded entries from the tally, and its window of finished attempts (the
    Prometheus counters) opens there — rows read from the attempts table, never a timing."""
    ledger.ensure_schema(conn)
    history = 3000
    conn.execute(
        """
        INSERT INTO celery_reconciler.attempts (policy_key, entry_id, attempt, fence_token,
            worker, outcome, started_at, finished_at)
        SELECT 't/p', n::text, 1, gen_random_uuid(), 'w', 'succeeded',
            now() - interval '1 hour', now() - interval '1 hour'
        FROM generate_series(1, %s) AS n
        """,
        [history],
    )
    conn.execute(
        "INSERT INTO celery_reconciler.tallies (policy_key, succeeded) VALUES ('t/p', %s)",
        [history],
    )
    conn.execute("ANALYZE celery_reconciler.attempts")

    with conn.transaction():
        first = ledger.status(conn, policy_key="t/p", outcomes_since=None)
        read_by_first = attempts_rows_read(conn)
    assert first.counts.succeeded == history  # from the tally
    # One row: the latest finished attempt (how long since workers last finished one, a
    # backwards index probe); not one row of the history besides.
    assert read_by_first == 1
    assert first.outcomes.succeeded == 0  # the counters start with this operator

    with conn.transaction():
        ledger.status(conn, policy_key="t/p", outcomes_since=first.outcomes.until)
        read_by_next = attempts_rows_read(conn)
    assert read_by_next < 10  # later reads look at their window only, as before


def rows_read(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows of each ledger table this transaction has read so far (sequential scans and
    index fetches)."""
    return {
        relname: int(read)
        for relname, read in conn.execute(
            "SELECT relname, seq_tup_read + coalesce(idx_tup_fetch, 0) "
            "FROM pg_stat_xact_user_tables WHERE schemaname = 'celery_reconciler'"
        ).fetchall()
    }


def ledger_truth(conn: psycopg.Connection[Any]) -> tuple[int, int, int, int]:
    """(in flight, retrying, succeeded, dead) of policy t/p, counted row by row."""
    row = conn.execute(
        """
        SELECT count(*) FILTER (WHERE state IN ('queued', 'running')),
            count(*) FILTER (WHERE state = 'retry_wait'),
            count(*) FILTER (WHERE state = 'succeeded'),
            count(*) FILTER (WHERE state = 'dead')
        FROM celery_reconciler.entries WHERE policy_key = 't/p'
        """
    ).fetchone()
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def status_counts(found: ledger.Status) -> tuple[int, int, int, int]:
    counts = found.counts
    return (counts.queued + counts.running, counts.retrying, counts.succeeded, counts.dead)


def test_counts_stay_right_across_a_restart_over_a_long_history(
    conn: psycopg.Connection[Any], demo_dsn: str
) -> None:
    """A long-running operator leaves a history (successes folded into the tally, their
    attempts kept), a few successes not folded yet and work in every state. An operator
    that starts on it — a new connection, no window of outcomes — reads every count right
    at once, without reading the history; and the counts keep following the transitions
    after the restart. Rows read, never a timing."""
    started = claimed_and_started(conn, [str(n) for n in range(1, 9)])
    history = 5000
    conn.execute(
        """
        INSERT INTO celery_reconciler.entries (policy_key, entry_id, state, attempt,
            fence_token, dispatched_at, started_at, finished_at, counted)
        SELECT 't/p', 'h' || n, 'succeeded', 1, gen_random_uuid(), now() - interval '1 hour',
            now() - interval '1 hour', now() - interval '1 hour', true
        FROM generate_series(1, %s) AS n
        """,
        [history],
    )
    conn.execute(
        """
        INSERT INTO celery_reconciler.attempts (policy_key, entry_id, attempt, fence_token,
            worker, outcome, dispatched_at, started_at, finished_at)
        SELECT policy_key, entry_id, 1, fence_token, 'w', 'succeeded', dispatched_at,
            started_at, finished_at
        FROM celery_reconciler.entries WHERE entry_id LIKE 'h%'
        """
    )
    conn.execute(
        "INSERT INTO celery_reconciler.tallies (policy_key, succeeded) VALUES ('t/p', %s)",
        [history],
    )
    for entry_id in ("1", "2"):  # succeeded, not folded into the tally yet
        assert ledger.record_success(conn, fence_token=started[entry_id].fence_token)
    assert ledger.record_failure(
        conn, fence_token=started["3"].fence_token, error="Boom", retry_in_seconds=600
    )
    assert ledger.record_failure(
        conn, fence_token=started["4"].fence_token, error="Boom", retry_in_seconds=None
    )
    conn.execute("VACUUM ANALYZE celery_reconciler.entries, celery_reconciler.attempts")
    truth = ledger_truth(conn)
    assert truth == (4, 1, history + 2, 1)

    # The restart: a connection of its own, and no window of outcomes yet.
    with psycopg.connect(demo_dsn, autocommit=True) as restarted, restarted.transaction():
        first = ledger.status(restarted, policy_key="t/p", outcomes_since=None)
        read = rows_read(restarted)
    assert status_counts(first) == truth
    assert first.outcomes.succeeded == 0  # the counters start with this operator
    # The unfinished rows and the successes not folded yet, the latest finished attempt:
    # what the backlog and the recent throughput cost, none of the history's rows.
    assert read.get("entries", 0) <= 8
    assert read.get("attempts", 0) <= 1

    # After the restart, the counts go on following the ledger.
    assert ledger.record_success(conn, fence_token=started["5"].fence_token)
    assert ledger.fold_successes(conn, policy_key="t/p") == 3
    again = claim_pending_again(conn, "h1")  # a success pending again leaves the tally
    assert [claim.again for claim in again] == [True]
    truth = ledger_truth(conn)
    assert truth == (4, 1, history + 2, 1)
    later = ledger.status(conn, policy_key="t/p", outcomes_since=first.outcomes.until)
    assert status_counts(later) == truth


def test_a_lease_below_the_heartbeat_timeout_of_the_policys_workers_is_flagged(
    conn: psycopg.Connection[Any],
) -> None:
    """Issue 22: ``lease.timeout: 5s`` under workers with a 20 s heartbeat timeout was
    accepted silently; the ledger knows the timeout of the workers running the policy's
    entries, and the policy shows the mismatch."""
    short = policy.parse_policy(schema.policy_spec(lease_timeout="5s"), namespace="t", name="p")
    claimed_and_started(conn, ["1"])  # under an incarnation with a 20 s heartbeat timeout
    found = ledger.status(conn, policy_key="t/p", outcomes_since=None)
    assert found.consumption.workers_heartbeat_timeout_seconds == 20.0

    type_, state, reason, message = conditions.lease_fits_workers(
        lease_seconds=short.lease.timeout_seconds,
        heartbeat_timeout_seconds=found.consumption.workers_heartbeat_timeout_seconds,
    )
    assert (type_, state, reason) == (
        conditions.LEASE_FITS_WORKERS,
        "False",
        conditions.LEASE_BELOW_HEARTBEAT_TIMEOUT,
    )
    assert "spec.lease.timeout" in message and "5s" in message and "20s" in message
    fitting = conditions.lease_fits_workers(lease_seconds=60, heartbeat_timeout_seconds=20)
    assert fitting[1] == "True"
