"""Safe reads of the user's table: keyset pages of pending ids, and "is it still pending?".

The user's table is the source of truth for "processed" (the policy's predicate); we never
ask the user to change it. This module is the only code that composes queries on it, and
they only read (``ledger.claim_page`` runs ``page_query`` inside its claim statement).

Cost follows the backlog, not the table: every query is "rows matching the predicate, after
the last key, in key order, limit n" (keyset pagination on ``(orderBy, idColumn)``), which an
index on the predicate answers by reading only pending rows — e.g. for
``pending: {column: insights_extracted, equals: false}`` and ``orderBy: created_at``::

    CREATE INDEX ON journal_entry (created_at, id) WHERE NOT insights_extracted;

Composition rules: table and column names are ``psycopg.sql.Identifier`` (validated by
``policy`` first). The predicate's constants are ``psycopg.sql.Literal`` — deliberately not
bound parameters: PostgreSQL matches a *partial* index like the one above only when it can
prove the query's predicate implies the index's, which it can do against a constant but not
against ``$1`` in a generic prepared plan. ``Literal`` quotes and types the value itself, so
nothing is concatenated. Keyset bounds, limits and id lists are bound parameters.

Ids of any type (bigint, uuid, text) come back as text (``id::text``), which is how the
ledger stores them; the native key is kept only to continue the keyset. Id lists sent back
(``filter_pending``) are bound as an untyped array literal, so PostgreSQL casts it to the id
column's own array type and the lookup uses the id index instead of comparing text.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from celery_reconciler import planning
from celery_reconciler import policy as policy_module


class SourceInvalid(RuntimeError):
    """The policy's table or columns do not work in this database; the fix is in the spec."""


@dataclasses.dataclass(frozen=True)
class PendingRow:
    entry_id: str
    key: tuple[Any, ...]  # the native keyset position: (orderBy, id) or (id,)


@dataclasses.dataclass(frozen=True)
class PendingSummary:
    count: int
    oldest_seconds: float | None  # age of the oldest pending entry, if orderBy is a time


def table_identifier(table: policy_module.TableName) -> sql.Identifier:
    if table.schema:
        return sql.Identifier(table.schema, table.table)
    return sql.Identifier(table.table)


def predicate(pending: policy_module.PendingPredicate, *, qualified: bool = True) -> sql.Composable:
    """The pending predicate as composed SQL (identifiers and literals, never raw text).

    ``qualified``: for our queries — the column qualified by our alias, and the literals
    ready for a query executed with parameters. Otherwise for a statement shown to a
    person (the index to create): the bare column and the literals as they are.
    """
    column = _column(pending.column) if qualified else sql.Identifier(pending.column)
    literal = _ParameterSafeLiteral if qualified else sql.Literal
    match pending:
        case policy_module.PendingEquals(value=value):
            return sql.SQL("{} = {}").format(column, literal(value))
        case policy_module.PendingIn(values=values):
            return sql.SQL("{} IN ({})").format(
                column, sql.SQL(", ").join(literal(value) for value in values)
            )
        case policy_module.PendingIsNull(is_null=is_null):
            return sql.SQL("{} IS NULL" if is_null else "{} IS NOT NULL").format(column)


class _ParameterSafeLiteral(sql.Literal):
    """A literal inside a query executed with parameters: psycopg takes every ``%`` of the
    query's text for a placeholder, inside quotes too, so a pending value such as
    ``'50% off'`` would fail every sweep. Its ``%`` are doubled, which psycopg undoes."""

    def as_bytes(self, context: Any = None) -> bytes:
        return super().as_bytes(context).replace(b"%", b"%%")


# The table's alias in our queries: qualified column references can never be mistaken for
# an output column (``SELECT id, id::text ... ORDER BY id`` would be ambiguous).
_ALIAS = "src"


def _column(name: str) -> sql.Identifier:
    return sql.Identifier(_ALIAS, name)


def _keyset_columns(source: policy_module.Source) -> list[sql.Identifier]:
    if source.orders_by_id:
        return [_column(source.id_column)]
    return [_column(source.order_by), _column(source.id_column)]


def key_width(source: policy_module.Source) -> int:
    """How many keyset columns ``page_query`` selects before the id."""
    return len(_keyset_columns(source))


# A condition on a row's id as text (its placeholders follow the keyset bound's).
RowFilter = Callable[[sql.Composable], sql.Composable]


def page_query(
    source: policy_module.Source, *, after: bool, skipping: RowFilter | None = None
) -> sql.Composed:
    """``SELECT key..., id::text FROM table WHERE pending [AND key > %s] [AND skipping(id)]
    ORDER BY key LIMIT %s``.

    ``skipping`` leaves rows out before the ``LIMIT``, so a page holds ``LIMIT`` rows that
    pass it (the ledger's ``not_held``: rows a sweep could claim) however many rows that
    fail it come first in keyset order — in one statement, not one page per such stretch.
    """
    keys = _keyset_columns(source)
    key_list = sql.SQL(", ").join(keys)
    where = predicate(source.pending)
    if after:
        bound = sql.SQL(", ").join(sql.Placeholder() for _ in keys)
        where = sql.SQL("{} AND ({}) > ({})").format(where, key_list, bound)
    if skipping is not None:
        entry_id = sql.SQL("{}::text").format(_column(source.id_column))
        where = sql.SQL("{} AND {}").format(where, skipping(entry_id))
    return sql.SQL(
        "SELECT {keys}, {id}::text FROM {table} AS {alias} WHERE {where} ORDER BY {keys} LIMIT %s"
    ).format(
        keys=key_list,
        id=_column(source.id_column),
        table=table_identifier(source.table),
        alias=sql.Identifier(_ALIAS),
        where=where,
    )


# Every sweep of every policy reads its first page and its status; composing those queries
# and rendering them (psycopg walks the tree of identifiers and literals at each execution)
# cost more CPU than the rest of an idle sweep's handling of them. So their text is kept,
# by what it is made of: the query, the source, and what rendering depends on — the
# connection's encoding and whether a backslash in a string literal is an escape.
_TEXTS_KEPT = 4096
_texts: dict[tuple[Hashable, ...], bytes] = {}


def _text(
    conn: psycopg.Connection[Any],
    source: policy_module.Source,
    key: tuple[Hashable, ...],
    compose: Callable[[], sql.Composed],
) -> bytes:
    """``compose()`` rendered for ``conn``, kept under ``source``, ``key`` and the
    connection's rendering context for the next call. A value the predicate cannot be sent
    with (a NUL byte) fails here, as ``SourceInvalid``."""
    context = (conn.info.encoding, conn.pgconn.parameter_status(b"standard_conforming_strings"))
    full = (source, *key, *context)
    text = _texts.get(full)
    if text is None:
        try:
            text = compose().as_bytes(conn)
        except psycopg.Error as error:
            raise _classified(error, source) from None
        if len(_texts) >= _TEXTS_KEPT:
            _texts.clear()  # policies come and go: forget them all now and then
        _texts[full] = text
    return text


def page_query_text(
    conn: psycopg.Connection[Any],
    source: policy_module.Source,
    *,
    after: bool,
    skipping: RowFilter | None = None,
) -> bytes:
    """``page_query`` rendered for ``conn``, kept for the next page and the next sweep."""
    return _text(
        conn,
        source,
        ("page", after, skipping),
        lambda: page_query(source, after=after, skipping=skipping),
    )


def pending_page(
    conn: psycopg.Connection[Any],
    source: policy_module.Source,
    *,
    after: tuple[Any, ...] | None,
    limit: int,
) -> list[PendingRow]:
    """The next ``limit`` pending entries after the keyset position ``after`` (None: start)."""
    if limit <= 0:
        return []
    query = page_query_text(conn, source, after=after is not None)
    params: list[Any] = [*(after or ()), limit]
    rows = _execute(conn, source, query, params).fetchall()
    return [PendingRow(entry_id=row[-1], key=tuple(row[:-1])) for row in rows]


def id_array_literal(entry_ids: Sequence[str]) -> str:
    """A PostgreSQL array literal of the ids, for an untyped or a ``::text[]`` parameter.

    One string built by ``str.join`` costs a fraction of psycopg's element-by-element list
    dumping, which was a tenth of a claim's time on a page of 500 ids.
    """
    quoted = (
        '"' + entry_id.replace("\\", "\\\\").replace('"', '\\"') + '"' for entry_id in entry_ids
    )
    return "{" + ",".join(quoted) + "}"


def filter_pending(
    conn: psycopg.Connection[Any], source: policy_module.Source, entry_ids: Sequence[str]
) -> set[str]:
    """Which of ``entry_ids`` still match the pending predicate (an indexed id lookup).

    Ids that cannot be the column's type (a ledger row left from an earlier ``idColumn``,
    say) cannot be pending; the lookup then compares as text, still bounded by the
    predicate, instead of failing every sweep.
    """
    if not entry_ids:
        return set()
    table = table_identifier(source.table)
    alias = sql.Identifier(_ALIAS)
    query = sql.SQL(
        "SELECT {id}::text FROM {table} AS {alias} WHERE {id} = ANY(%s) AND {where}"
    ).format(
        id=_column(source.id_column), table=table, alias=alias, where=predicate(source.pending)
    )
    try:
        with conn.transaction():  # a savepoint inside the caller's claim transaction
            rows = conn.execute(query, [id_array_literal(entry_ids)]).fetchall()
    except (psycopg.errors.InvalidTextRepresentation, psycopg.errors.NumericValueOutOfRange):
        # Ids that cannot be the column's type, or a predicate value that cannot: the text
        # comparison below tells the two apart (it fails again only for the predicate).
        as_text = sql.SQL(
            "SELECT {id}::text FROM {table} AS {alias} WHERE {id}::text = ANY(%s) AND {where}"
        ).format(
            id=_column(source.id_column), table=table, alias=alias, where=predicate(source.pending)
        )
        rows = _execute(conn, source, as_text, [list(entry_ids)]).fetchall()
    except psycopg.Error as error:
        raise _classified(error, source) from None
    return {row[0] for row in rows}


def summary_query(source: policy_module.Source) -> sql.Composed:
    """The pending count and the oldest pending entry's ``orderBy``, in one statement."""
    table = table_identifier(source.table)
    alias = sql.Identifier(_ALIAS)
    where = predicate(source.pending)
    # ORDER BY ... LIMIT 1 rather than min(): it works for every orderable type (min() does
    # not exist for uuid) and reads one entry of the pending index. One statement, one
    # round trip: the status of every policy reads it after every sweep.
    return sql.SQL(
        "SELECT (SELECT count(*) FROM {table} AS {alias} WHERE {where}), "
        "(SELECT {order} FROM {table} AS {alias} WHERE {where} ORDER BY {order} LIMIT 1)"
    ).format(order=_column(source.order_by), table=table, alias=alias, where=where)


def pending_summary(conn: psycopg.Connection[Any], source: policy_module.Source) -> PendingSummary:
    """How many entries match the predicate (in flight or not) and how old the oldest is."""
    query = _text(conn, source, ("summary",), lambda: summary_query(source))
    row = _execute(conn, source, query, []).fetchone()
    assert row is not None
    count, oldest = row
    oldest_seconds: float | None = None
    if isinstance(oldest, datetime.datetime):
        # Age by the database's clock: a timestamptz against now(), a plain timestamp
        # against the session's local time (how such columns are usually filled).
        age = (
            sql.SQL("SELECT EXTRACT(EPOCH FROM now() - %s::timestamptz)")
            if oldest.tzinfo
            else sql.SQL("SELECT EXTRACT(EPOCH FROM localtimestamp - %s::timestamp)")
        )
        age_row = conn.execute(age, [oldest]).fetchone()
        assert age_row is not None
        oldest_seconds = max(0.0, float(age_row[0]))
    return PendingSummary(count=int(count), oldest_seconds=oldest_seconds)


@dataclasses.dataclass(frozen=True)
class IndexAdvice:
    table_rows: int
    create_index: str  # the statement a person would run, composed like every query here


def index_advice(
    conn: psycopg.Connection[Any], source: policy_module.Source, *, page_size: int
) -> IndexAdvice | None:
    """``None`` when the pending page is read through an index that holds the predicate;
    otherwise the index to create. Reads only the plan (``EXPLAIN`` without ``ANALYZE``)
    and the table's row estimate, so asking costs about nothing."""
    explain = sql.SQL("EXPLAIN (FORMAT JSON) ") + page_query(source, after=False)
    explained = _execute(conn, source, explain, [page_size]).fetchone()
    estimate = conn.execute(
        "SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND n.nspname = coalesce(%s, current_schema())",
        [source.table.table, source.table.schema],
    ).fetchone()
    if explained is None or estimate is None:
        return None
    plan = explained[0][0] if isinstance(explained[0], list) else explained[0]
    table_rows = int(estimate[0])
    if not planning.page_needs_index(
        plan,
        relation=source.table.table,
        predicate_column=source.pending.column,
        table_rows=table_rows,
    ):
        return None
    keys = (
        [sql.Identifier(source.id_column)]
        if source.orders_by_id
        else [sql.Identifier(source.order_by), sql.Identifier(source.id_column)]
    )
    statement = sql.SQL("CREATE INDEX CONCURRENTLY ON {table} ({keys}) WHERE {where}").format(
        table=table_identifier(source.table),
        keys=sql.SQL(", ").join(keys),
        where=predicate(source.pending, qualified=False),
    )
    return IndexAdvice(table_rows=table_rows, create_index=statement.as_string(conn))


def _execute(
    conn: psycopg.Connection[Any],
    source: policy_module.Source,
    query: sql.Composed | bytes,
    params: Sequence[Any],
) -> psycopg.Cursor[Any]:
    """Run one query on the user's table; a failure that the spec causes is ``SourceInvalid``.

    Losing the connection (and the server shutting down) is left to the caller, which turns
    it into ``DatabaseUnavailable``: that heals by itself, a wrong spec does not.
    """
    try:
        return conn.execute(query, params)
    except psycopg.Error as error:
        raise _classified(error, source) from None


def _classified(error: psycopg.Error, source: policy_module.Source) -> Exception:
    """``SourceInvalid`` for a failure the spec causes; otherwise ``error`` itself."""
    message = invalid_source_message(
        sqlstate=error.sqlstate,
        detail=error.diag.message_primary or str(error).strip() or type(error).__name__,
        source=source,
    )
    return error if message is None else SourceInvalid(message)


# SQLSTATE classes that mean "the server or the connection failed", not "the spec is wrong":
# connection exceptions, insufficient resources, operator intervention (shutdown), system
# and internal errors. These heal by themselves and are ``DatabaseUnavailable``.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "58", "XX")


def invalid_source_message(
    *,
    sqlstate: str | None,
    detail: str,
    source: policy_module.Source,
) -> str | None:
    """What to tell the user when a query on their table failed, naming the field to fix.

    ``None`` when the failure is not the spec's (the connection or server failed), so the
    caller reports it as ``DatabaseUnavailable`` and retries. Pure: it sees only the
    SQLSTATE and the server's primary message, so it is unit-tested without a database.
    A client-side ``DataError`` (no SQLSTATE: a NUL byte in a value) is the predicate's.
    """
    table = source.table
    value_field = _predicate_value_field(source.pending)
    if sqlstate == "57014":
        return (
            f"the query for pending entries of {table} was cancelled ({detail}) — it reads "
            "more than the statement timeout allows: index the predicate (see "
            "docs/concepts.md) or narrow spec.source.pending"
        )
    if sqlstate is not None and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
        return None
    if sqlstate in ("42P01", "3F000"):
        return (
            f"table {table} does not exist ({detail}) — fix spec.source.table or create the table"
        )
    if sqlstate == "42703":
        fields = _fields_of_missing_column(detail, source)
        return (
            f"a column of the policy is missing in table {table} ({detail}) — fix "
            + " or ".join(fields)
        )
    if sqlstate == "42501":
        return (
            f"the database user may not read {table} ({detail}) — GRANT SELECT on it to the "
            "user in spec.source.databaseSecretRef"
        )
    if sqlstate == "42883" and "ordering operator" in detail:
        order_field = "spec.source.idColumn" if source.orders_by_id else "spec.source.orderBy"
        return (
            f"entries of {table} cannot be ordered by column {source.order_by} ({detail}) — "
            f"fix {order_field}: it must name a column of an orderable type (a number, a "
            "timestamp, text, uuid)"
        )
    if sqlstate in ("42883", "42804", "42846") or sqlstate is None or sqlstate[:2] == "22":
        return (
            f"{value_field} does not fit column {source.pending.column} of {table} ({detail}) "
            f"— fix {value_field} or spec.source.pending.column"
        )
    return f"the query for pending entries of {table} failed ({detail}) — check spec.source"


def _predicate_value_field(pending: policy_module.PendingPredicate) -> str:
    match pending:
        case policy_module.PendingEquals():
            return "spec.source.pending.equals"
        case policy_module.PendingIn():
            return "spec.source.pending.in"
        case policy_module.PendingIsNull():
            return "spec.source.pending.isNull"


def _fields_of_missing_column(detail: str, source: policy_module.Source) -> list[str]:
    """The spec fields naming the column the server says is missing (all three when the
    message does not say which)."""
    named = {
        "spec.source.idColumn": source.id_column,
        "spec.source.pending.column": source.pending.column,
        "spec.source.orderBy": source.order_by,
    }
    found = [
        field
        for field, column in named.items()
        if re.search(rf'(?:^|[\s."]){re.escape(column)}(?:$|[\s"])', detail)
    ]
    return found or list(named)
