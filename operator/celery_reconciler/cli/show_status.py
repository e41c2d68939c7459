"""``status``: is my work getting done? Every policy with its counts, one table (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from celery_reconciler import kube
from celery_reconciler.cli import cluster_access, conventions, formatting


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    cluster = cluster_access.connect_cluster(args)
    namespace = None if args.all_namespaces else cluster_access.namespace_of(args, cluster)
    rows = formatting.status_rows(
        kube.list_policies(namespace=namespace),
        kube.list_processing_statuses(namespace=namespace),
    )
    if args.output == "json":
        out.write(json.dumps({"items": [row.as_json() for row in rows]}, indent=2) + "\n")
    elif not rows:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No processing policies found in {where}.", file=sys.stderr)
    else:
        out.write(
            formatting.format_status_table(
                rows, all_namespaces=namespace is None, now=cluster_access.utc_now()
            )
        )
    return conventions.EXIT_OK


def add_command(subparsers: Any) -> None:
    status = conventions.add_subcommand(
        subparsers, "status", cmd_status, help="pending, in-flight and dead counts per policy"
    )
    cluster_access.add_cluster_arguments(status, all_namespaces=True)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
