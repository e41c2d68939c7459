"""``explain``: the ledger history of one entry. Its DSN comes from ``--dsn``,
``CELERY_RECONCILER_DSN`` or the policy's ``spec.source.databaseSecretRef`` Secret (read
through the API with the person's credentials)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any, TextIO

import psycopg
import urllib3

from celery_reconciler import kube, ledger
from celery_reconciler.cli import cluster_access, conventions, formatting


def cmd_explain(args: argparse.Namespace, out: TextIO) -> int:
    cluster = cluster_access.connect_cluster(args)
    namespace, name = cluster_access.namespace_of(args, cluster), args.policy
    policy = cluster_access.existing_policy(namespace=namespace, name=name)
    dsn = (
        args.dsn
        or os.environ.get(conventions.DSN_ENVIRONMENT_VARIABLE)
        or policy_dsn(policy, cluster)
    )
    policy_key = f"{namespace}/{name}"
    conn = ledger.connect(
        dsn,
        application_name="celery-reconciler explain",
        statement_timeout_seconds=ledger.OPERATOR_STATEMENT_TIMEOUT_SECONDS,
        lock_timeout_seconds=ledger.OPERATOR_LOCK_TIMEOUT_SECONDS,
    )
    try:
        history = ledger.history(conn, policy_key=policy_key, entry_id=args.entry_id)
    except psycopg.errors.UndefinedTable:
        raise conventions.UsageError(
            f"the ledger (schema {ledger.SCHEMA}) does not exist in {ledger.describe_dsn(dsn)}"
            f": the operator has not swept {policy_key} yet — check "
            f"`{conventions.prog_name()} status -n {namespace}`"
        ) from None
    except psycopg.Error as error:
        raise ledger.database_failure(error, dsn=dsn, doing="reading the ledger") from None
    finally:
        conn.close()
    if history is None:
        raise conventions.UsageError(
            f'entry "{args.entry_id}" has no ledger history in policy {policy_key}: the '
            "operator never dispatched it — check that the id exists and matches "
            "spec.source.pending, or wait for the next sweep"
        )
    if args.output == "json":
        out.write(json.dumps(formatting.history_as_json(history), indent=2) + "\n")
    else:
        out.write(formatting.format_history(history))
    return conventions.EXIT_OK


def policy_dsn(policy: Mapping[str, Any], cluster: kube.Cluster) -> str:
    """The DSN from the policy's database Secret, read with the person's credentials."""
    metadata, spec = policy["metadata"], policy.get("spec") or {}
    ref = (spec.get("source") or {}).get("databaseSecretRef") or {}
    if not ref.get("name"):
        raise conventions.UsageError(
            f"processingpolicy {metadata['name']} has no spec.source.databaseSecretRef: pass "
            f"--dsn or set {conventions.DSN_ENVIRONMENT_VARIABLE}"
        )
    try:
        return kube.read_secret_value(
            namespace=metadata["namespace"],
            name=ref["name"],
            key=ref.get("key") or "dsn",
            field="spec.source.databaseSecretRef",
        )
    except urllib3.exceptions.HTTPError:
        raise kube.KubernetesUnreachable(
            f"cannot reach the Kubernetes API server at {cluster.server} — check KUBECONFIG "
            "(or --kubeconfig) and that the cluster is running"
        ) from None


def add_command(subparsers: Any) -> None:
    explain = conventions.add_subcommand(
        subparsers,
        "explain",
        cmd_explain,
        help="the ledger history of one entry: attempts, fence tokens, workers, errors",
    )
    explain.add_argument("policy", metavar="POLICY")
    explain.add_argument("entry_id", metavar="ENTRY_ID")
    cluster_access.add_cluster_arguments(explain, all_namespaces=False)
    explain.add_argument(
        "--dsn",
        help=f"PostgreSQL DSN (default: ${conventions.DSN_ENVIRONMENT_VARIABLE}, else the "
        "policy's Secret)",
    )
    explain.add_argument("-o", "--output", choices=("text", "json"), default="text")
