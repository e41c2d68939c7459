"""The ``celery-reconciler`` command (also ``python -m celery_reconciler``, a kubectl plugin).

Verbs are argparse subcommands, each a small function that gathers its inputs, calls one
module that does the work and prints a human summary (``-o json`` where a script may read it):

    celery-reconciler sweep --policy policy.yaml [--dsn DSN] [--broker URL]
    celery-reconciler run ...                          the operator itself
    celery-reconciler status [-n NS | -A] [-o json]    is my work getting done?
    celery-reconciler sweep-now POLICY [-n NS] [--wait]
    celery-reconciler retry-dead POLICY [-n NS] [--ids 1,2,3] [--wait]
    celery-reconciler explain POLICY ENTRY_ID [-n NS] [-o json]
    celery-reconciler grants --database DB --table SCHEMA.TABLE [--operator-role ...]

One module a group of verbs: ``sweep`` (offline, from a policy file), ``grants`` (prints,
connects to nothing), ``show_status``, ``operator_requests`` (``sweep-now``, ``retry-dead``) and
``explain`` (the cluster verbs, through ``cluster_access``); ``formatting`` is what they
print, ``conventions`` what they share, ``entry`` the parser and the exit codes. The cluster
verbs never sweep themselves, so the single active operator stays the only dispatcher.

Installed as ``kubectl-celery_reconciler`` too, so ``kubectl celery-reconciler status`` works.
Secrets are never printed: errors name the server, not the credentials.
"""

from celery_reconciler.cli.conventions import (
    BROKER_ENVIRONMENT_VARIABLE,
    DSN_ENVIRONMENT_VARIABLE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
)
from celery_reconciler.cli.entry import build_parser, main
from celery_reconciler.cli.formatting import (
    STATUS_HEADER,
    StatusRow,
    age,
    format_history,
    format_status_table,
    history_as_json,
    human_duration,
    render_table,
    status_rows,
)
from celery_reconciler.cli.operator_requests import parse_entry_ids
from celery_reconciler.cli.sweep import load_policy

__all__ = [
    "BROKER_ENVIRONMENT_VARIABLE",
    "DSN_ENVIRONMENT_VARIABLE",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "STATUS_HEADER",
    "StatusRow",
    "UsageError",
    "age",
    "build_parser",
    "format_history",
    "format_status_table",
    "history_as_json",
    "human_duration",
    "load_policy",
    "main",
    "parse_entry_ids",
    "render_table",
    "status_rows",
]
