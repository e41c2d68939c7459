"""The ledger's record of which policy holds which table, on a real PostgreSQL.

The table is recorded by OID, so spellings that name one table agree and a table of the
same name in another schema does not; a record is removed only for the uid it was made by.
"""

from __future__ import annotations

import dataclasses

import psycopg
import pytest
from psycopg import conninfo
from reconcile_support import make_policy

from celery_app.demo import schema
from celery_reconciler import ledger, overlaps, policy, reconcile
from tests.e2e.hostile_corpus import CROSS_NAMESPACE_CASES, CrossNamespaceCase


def on_table(policy_: policy.Policy, table: policy.TableName, *, namespace: str) -> policy.Policy:
    source = dataclasses.replace(policy_.source, table=table)
    return dataclasses.replace(policy_, source=source, namespace=namespace)


def test_spellings_of_one_table_meet_and_another_schemas_table_of_that_name_does_not(
    database_dsn: str,
) -> None:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        conn.execute("CREATE SCHEMA archive")
        conn.execute("CREATE TABLE archive.journal_entry (id bigint PRIMARY KEY)")
        ledger.ensure_schema(conn)
    base = make_policy()
    first = on_table(base, policy.TableName(None, "journal_entry"), namespace="team-a")
    second = on_table(base, policy.TableName("public", "journal_entry"), namespace="team-b")
    archived = on_table(base, policy.TableName("archive", "journal_entry"), namespace="team-c")
    db = reconcile.Database(database_dsn)
    try:
        held_first = overlaps.held_by(first, uid="uid-1", created="2026-01-01T00:00:00Z")
        held_second = overlaps.held_by(second, uid="uid-2", created="2026-01-02T00:00:00Z")
        held_archived = overlaps.held_by(archived, uid="uid-3", created="2026-01-03T00:00:00Z")
        assert reconcile.arbitrate(first, db=db, mine=held_first) is None
        found = reconcile.arbitrate(second, db=db, mine=held_second)
        assert found is not None
        conflict, winner = found
        assert (conflict.loser, conflict.winner) == (second.key, first.key)
        assert winner == held_first
        assert reconcile.arbitrate(archived, db=db, mine=held_archived) is None
        # The older policy never yields, however often it records its work.
        assert reconcile.arbitrate(first, db=db, mine=held_first) is None

        # A record is removed only for the uid that made it: a recreated policy keeps its own.
        reconcile.forget_work(db, policy_key=first.key, policy_uid="uid-of-an-older-life")
        assert reconcile.arbitrate(second, db=db, mine=held_second) is not None
        reconcile.forget_work(db, policy_key=first.key, policy_uid="uid-1")
        assert reconcile.arbitrate(second, db=db, mine=held_second) is None
    finally:
        db.close()


def test_a_missing_table_conflicts_with_nothing(database_dsn: str) -> None:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        ledger.ensure_schema(conn)
    base = make_policy()
    one = on_table(base, policy.TableName(None, "missing"), namespace="a")
    two = on_table(base, policy.TableName(None, "missing"), namespace="b")
    db = reconcile.Database(database_dsn)
    try:
        mine_one = overlaps.held_by(one, uid="1", created="1")
        mine_two = overlaps.held_by(two, uid="2", created="2")
        assert reconcile.arbitrate(one, db=db, mine=mine_one) is None
        assert reconcile.arbitrate(two, db=db, mine=mine_two) is None
    finally:
        db.close()


@pytest.mark.parametrize("case", CROSS_NAMESPACE_CASES, ids=lambda case: case.name)
def test_a_policy_in_another_namespace_on_the_same_rows_yields_however_it_spells_them(
    database_dsn: str, case: CrossNamespaceCase
) -> None:
    """The hostile corpus's cross-namespace class: two namespaces, one database and table."""
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        schema.create_schema(conn)
        ledger.ensure_schema(conn)
    base = make_policy()
    first = on_table(base, table_name(case.first_table), namespace="tenant-a")
    second = on_table(base, table_name(case.second_table), namespace="tenant-b")
    second_dsn = database_dsn
    if case.second_dsn_as_key_values:
        params = conninfo.conninfo_to_dict(database_dsn)
        second_dsn = " ".join(f"{key}={value}" for key, value in sorted(params.items()))
    first_db, second_db = reconcile.Database(database_dsn), reconcile.Database(second_dsn)
    try:
        held_first = overlaps.held_by(first, uid="uid-a", created="2026-01-01T00:00:00Z")
        held_second = overlaps.held_by(second, uid="uid-b", created="2026-01-02T00:00:00Z")
        assert reconcile.arbitrate(first, db=first_db, mine=held_first) is None
        found = reconcile.arbitrate(second, db=second_db, mine=held_second)
        assert found is not None
        assert (found[0].loser, found[0].winner) == (second.key, first.key)
        assert reconcile.arbitrate(first, db=first_db, mine=held_first) is None
    finally:
        first_db.close()
        second_db.close()


def table_name(text: str) -> policy.TableName:
    schema_name, _, table = text.rpartition(".")
    return policy.TableName(schema_name or None, table)
