"""``sweep``: one sweep from a policy file, offline — no cluster, the DSN and broker URL from
flags or the environment instead of the policy's Secrets."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TextIO

import yaml

from celery_reconciler import broker as broker_module
from celery_reconciler import policy as policy_module
from celery_reconciler import reconcile
from celery_reconciler.cli import conventions


def load_policy(path: Path, *, namespace: str | None = None) -> policy_module.Policy:
    """Read a ProcessingPolicy manifest or a bare spec from YAML."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise conventions.UsageError(f"cannot read policy file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise conventions.UsageError(f"policy file {path} is not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise conventions.UsageError(f"policy file {path} must hold a ProcessingPolicy or its spec")
    if "spec" in document:
        metadata = document.get("metadata") or {}
        spec = document["spec"]
        name = str(metadata.get("name") or path.stem)
        namespace = namespace or str(metadata.get("namespace") or "default")
    else:
        spec, name, namespace = document, path.stem, namespace or "default"
    return policy_module.parse_policy(
        spec, namespace=namespace, name=name, require_secret_refs=False
    )


def _secret_setting(value: str | None, variable: str, flag: str) -> str:
    resolved = value or os.environ.get(variable)
    if not resolved:
        raise conventions.UsageError(f"no {flag.lstrip('-')} given: pass {flag} or set {variable}")
    return resolved


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", type=Path, required=True, help="ProcessingPolicy YAML (or its spec)"
    )
    parser.add_argument(
        "--namespace", help="namespace of the policy key (default: the manifest's, or default)"
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL DSN of the entries' database "
        f"(default: ${conventions.DSN_ENVIRONMENT_VARIABLE})",
    )


def cmd_sweep(args: argparse.Namespace, out: TextIO) -> int:
    policy = load_policy(args.policy, namespace=args.namespace)
    dsn = _secret_setting(args.dsn, conventions.DSN_ENVIRONMENT_VARIABLE, "--dsn")
    url = _secret_setting(args.broker, conventions.BROKER_ENVIRONMENT_VARIABLE, "--broker")
    db = reconcile.Database(dsn, application_name="celery-reconciler cli")
    publisher = broker_module.connect(url, transport_options=policy.task.transport_options())
    try:
        result = reconcile.reconcile_once(policy, db=db, broker=publisher)
    finally:
        publisher.close()
        db.close()
    expired = result.expired
    out.write(
        f"swept {result.policy_key}: dispatched {result.published} entries in "
        f"{result.pages} page(s) ({result.duration_seconds:.2f}s, "
        f"{result.entries_per_second:.0f}/s); {result.in_flight_before} were in flight; "
        f"expired leases: {expired.retry_now} retried, {expired.dead} dead, "
        f"{expired.unstarted} unstarted; settled {result.settled}"
        + (" (suspended: nothing dispatched)" if result.suspended else "")
        + "\n"
    )
    return conventions.EXIT_OK


def add_command(subparsers: Any) -> None:
    sweep = conventions.add_subcommand(
        subparsers,
        "sweep",
        cmd_sweep,
        help="run one sweep: expire stale leases, claim pending entries, publish them",
    )
    add_policy_arguments(sweep)
    sweep.add_argument(
        "--broker", help=f"Celery broker URL (default: ${conventions.BROKER_ENVIRONMENT_VARIABLE})"
    )
