"""``grants``: the GRANT statements of the ledger's three roles (``ledger_roles``), printed
for a DBA to run; it connects to nothing."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from celery_reconciler import ledger_roles
from celery_reconciler import policy as policy_module
from celery_reconciler.cli import conventions


def qualified_table(text: str) -> tuple[str, str]:
    """``schema.table`` (``table`` alone: ``public``), each part a plain SQL identifier."""
    parts = text.split(".")
    if len(parts) > 2 or not all(policy_module.IDENTIFIER_PATTERN.fullmatch(p) for p in parts):
        raise conventions.UsageError(
            f"--table {text!r}: write schema.table (or table, in schema public), each part "
            "letters, digits and underscores"
        )
    return (parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0])


def cmd_grants(args: argparse.Namespace, out: TextIO) -> int:
    roles = ledger_roles.Roles(
        operator=args.operator_role, worker=args.worker_role, reader=args.reader_role
    )
    tables = [qualified_table(table) for table in args.table]
    out.write(ledger_roles.script(database=args.database, tables=tables, roles=roles))
    return conventions.EXIT_OK


def add_grants_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", required=True, help="the database of the entries' table")
    parser.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="SCHEMA.TABLE",
        help="a table the policies read (spec.source.table); repeat for several",
    )
    for role, default in (
        ("operator", ledger_roles.DEFAULT_OPERATOR_ROLE),
        ("worker", ledger_roles.DEFAULT_WORKER_ROLE),
        ("reader", ledger_roles.DEFAULT_READER_ROLE),
    ):
        parser.add_argument(
            f"--{role}-role", default=default, help=f"the {role}'s role (default {default})"
        )


def add_command(subparsers: Any) -> None:
    add_grants_arguments(
        conventions.add_subcommand(
            subparsers,
            "grants",
            cmd_grants,
            help="print the GRANTs of the ledger's roles: operator, worker, reader",
        )
    )
