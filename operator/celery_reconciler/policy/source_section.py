"""``spec.source``: the user's table, its id and order columns, and which rows are pending.

The pending predicate is structured (``equals`` / ``in`` / ``isNull``), never raw SQL.
"""

from __future__ import annotations

from typing import Any

from celery_reconciler.policy import fields, records

DEFAULT_ID_COLUMN = "id"
DEFAULT_DATABASE_SECRET_KEY = "dsn"


def parse(value: Any, *, reader: fields.FieldReader, require_secrets: bool) -> records.Source:
    path = "spec.source"
    raw = reader.mapping(
        value,
        path,
        allowed=("databaseSecretRef", "table", "idColumn", "pending", "orderBy"),
    )
    secret = reader.secret_ref(
        raw.get("databaseSecretRef"),
        f"{path}.databaseSecretRef",
        default_key=DEFAULT_DATABASE_SECRET_KEY,
        required=require_secrets,
    )
    table = table_name(raw.get("table"), reader=reader, path=f"{path}.table")
    id_column = reader.identifier(raw.get("idColumn", DEFAULT_ID_COLUMN), f"{path}.idColumn")
    pending = pending_predicate(raw.get("pending"), reader=reader, path=f"{path}.pending")
    order_by = raw.get("orderBy")
    order_column = id_column if order_by is None else reader.identifier(order_by, f"{path}.orderBy")
    return records.Source(
        database_secret=secret,
        table=table,
        id_column=id_column,
        pending=pending,
        order_by=order_column,
    )


def table_name(value: Any, *, reader: fields.FieldReader, path: str) -> records.TableName:
    if not isinstance(value, str) or not value:
        reader.problem(path, 'is required: "table" or "schema.table"')
        return records.TableName(schema=None, table="invalid")
    parts = value.split(".")
    if len(parts) > 2 or not all(fields.IDENTIFIER_PATTERN.fullmatch(part) for part in parts):
        reader.problem(
            path,
            f'{value!r} is not a SQL identifier: write "table" or "schema.table", each '
            "part letters, digits and underscores, starting with a letter or underscore, "
            "at most 63 characters",
        )
        return records.TableName(schema=None, table="invalid")
    if len(parts) == 2:
        return records.TableName(schema=parts[0], table=parts[1])
    return records.TableName(schema=None, table=parts[0])


def pending_predicate(
    value: Any, *, reader: fields.FieldReader, path: str
) -> records.PendingPredicate:
    fallback = records.PendingIsNull(column="invalid", is_null=True)
    if value is None:
        reader.problem(path, "is required: {column: <name>, equals: <value>} (or in / isNull)")
        return fallback
    raw = reader.mapping(value, path, allowed=("column", "equals", "in", "isNull"))
    if not raw:
        return fallback
    column = reader.identifier(raw.get("column"), f"{path}.column")
    given = [key for key in ("equals", "in", "isNull") if key in raw]
    if len(given) != 1:
        reader.problem(
            path,
            "needs exactly one of equals, in or isNull"
            + (f" (got {', '.join(given)})" if given else ""),
        )
        return fallback
    match given[0]:
        case "equals":
            equals = raw["equals"]
            if not isinstance(equals, bool | int | str) or (isinstance(equals, str) and not equals):
                reader.problem(
                    f"{path}.equals",
                    f"must be a boolean, an integer or a non-empty string, got "
                    f"{fields.describe(equals)}",
                )
                return fallback
            return records.PendingEquals(column=column, value=equals)
        case "in":
            return (
                pending_in(raw["in"], reader=reader, path=f"{path}.in", column=column) or fallback
            )
        case _:
            return records.PendingIsNull(
                column=column, is_null=reader.boolean(raw["isNull"], f"{path}.isNull")
            )


def pending_in(
    value: Any, *, reader: fields.FieldReader, path: str, column: str
) -> records.PendingIn | None:
    if not isinstance(value, list) or not value:
        reader.problem(path, f"must be a non-empty list of values, got {fields.describe(value)}")
        return None
    if all(isinstance(item, str) and item for item in value):
        return records.PendingIn(column=column, values=tuple(str(item) for item in value))
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return records.PendingIn(column=column, values=tuple(int(item) for item in value))
    reader.problem(path, "must hold only non-empty strings or only integers")
    return None
