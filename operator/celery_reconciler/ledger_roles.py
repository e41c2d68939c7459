"""The ledger's three database roles, as the GRANT statements ``celery-reconciler grants``
prints.

One database login for everything made every worker a possible owner of the ledger: the
policy's own DSN can drop the schema, read every tenant's entries, end other workers'
incarnations and forge the operator's owner rows. Least privilege splits it in three:

* the **operator's** role owns schema ``celery_reconciler`` (it creates and migrates it on
  its first sweep) and reads the entries' tables: the login of the policy's Secret;
* the **worker's** role reaches the ledger only through the ``SECURITY DEFINER`` functions
  of ``celery_reconciler_worker.ledger.WORKER_FUNCTIONS``: it may read which migrations
  ran, and nothing else of the schema — no table, no sequence;
* the **reader's** role (dashboards, KEDA's postgresql trigger) reads the ``backlog`` view.

The statements come in two parts, because the second names objects that only exist once
the operator has migrated the schema, and only their owner (or a superuser) may grant on
them: the first is an administrator's, once; the second is the operator's login's, after
the schema exists and again after each upgrade (every statement is idempotent). Roles are
not created here: their logins and passwords are the administrator's to choose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from psycopg import sql

from celery_reconciler_worker import ledger as worker_ledger

DEFAULT_OPERATOR_ROLE = "celery_reconciler_operator"
DEFAULT_WORKER_ROLE = "celery_reconciler_worker"
DEFAULT_READER_ROLE = "celery_reconciler_reader"

# The line that separates the administrator's part from the operator's in the printed text.
OPERATOR_PART_MARKER = "-- Part 2"


@dataclasses.dataclass(frozen=True)
class Roles:
    operator: str = DEFAULT_OPERATOR_ROLE
    worker: str = DEFAULT_WORKER_ROLE
    reader: str = DEFAULT_READER_ROLE


@dataclasses.dataclass(frozen=True)
class Grants:
    administrator: tuple[sql.Composed, ...]  # once, before the operator's first sweep
    operator: tuple[sql.Composed, ...]  # as the schema's owner, once it exists


def grants(*, database: str, tables: Sequence[tuple[str, str]], roles: Roles) -> Grants:
    """What each role needs on ``database``; ``tables`` are the (schema, table) pairs the
    operator's policies read."""
    schema = sql.Identifier(worker_ledger.SCHEMA)
    database_name = sql.Identifier(database)
    operator, worker, reader = (
        sql.Identifier(role) for role in (roles.operator, roles.worker, roles.reader)
    )
    administrator = [
        sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(database_name, operator),
    ]
    for table_schema in sorted({table_schema for table_schema, _ in tables}):
        administrator.append(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(table_schema), operator)
        )
    for table_schema, table in tables:
        administrator.append(
            sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
                sql.Identifier(table_schema, table), operator
            )
        )
    administrator += [
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database_name, role)
        for role in (worker, reader)
    ]
    owner = [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, worker),
        sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
            sql.Identifier(worker_ledger.SCHEMA, "schema_migrations"), worker
        ),
        *(
            sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(function.signature, worker)
            for function in worker_ledger.WORKER_FUNCTIONS
        ),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, reader),
        sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(worker_ledger.BACKLOG, reader),
    ]
    return Grants(administrator=tuple(administrator), operator=tuple(owner))


def script(*, database: str, tables: Sequence[tuple[str, str]], roles: Roles) -> str:
    """The grants as a psql script, each part introduced by who runs it and when."""
    parts = grants(database=database, tables=tables, roles=roles)
    lines = [
        "-- Part 1: as a database administrator, once. Create the roles first, with logins",
        f"-- of your choosing (CREATE ROLE ... LOGIN PASSWORD ...): {roles.operator} for the",
        f"-- policy's Secret, {roles.worker} for the workers' CELERY_RECONCILER_DSN,",
        f"-- {roles.reader} for dashboards and KEDA. A body that commits through",
        f"-- fenced_transaction on a connection of its own: GRANT {roles.worker} TO <its login>.",
        *(f"{statement.as_string(None)};" for statement in parts.administrator),
        "",
        f"{OPERATOR_PART_MARKER}: as {roles.operator}, once schema {worker_ledger.SCHEMA} exists",
        "-- (the operator creates it on its first sweep), and again after each upgrade.",
        f"-- {roles.worker} may only call the worker's functions; {roles.reader} reads backlog.",
        *(f"{statement.as_string(None)};" for statement in parts.operator),
    ]
    return "\n".join(lines) + "\n"
