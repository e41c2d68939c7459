"""The ``celery-reconciler`` command (also ``python -m celery_reconciler``, a kubectl plugin).

Verbs are argparse subcommands, each a small function that parses a policy, calls
``reconcile`` and prints a human summary; more verbs (``status``, ``sweep-now``,
``retry-dead``, ``explain``) plug in through ``add_subcommand``. For now:

    celery-reconciler sweep --policy policy.yaml [--dsn DSN] [--broker URL]

The policy file is a ProcessingPolicy manifest (``kind: ProcessingPolicy``) or a bare spec.
The DSN and broker URL come from ``--dsn``/``--broker`` or, better (they stay out of shell
history and ``ps``), from ``CELERY_RECONCILER_DSN`` and ``CELERY_BROKER_URL``. Neither is
ever printed: errors name the server, not the credentials.

Exit codes: 0 done; 1 a component is unavailable (retry later); 2 bad usage or invalid
policy.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from celery_reconciler import broker as broker_module
from celery_reconciler import policy as policy_module
from celery_reconciler import reconcile, runner

DSN_ENVIRONMENT_VARIABLE = "CELERY_RECONCILER_DSN"
BROKER_ENVIRONMENT_VARIABLE = "CELERY_BROKER_URL"
EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace, TextIO], int]


class UsageError(Exception):
    """Bad input from the user; the message says what to change."""


def load_policy(path: Path, *, namespace: str | None = None) -> policy_module.Policy:
    """Read a ProcessingPolicy manifest or a bare spec from YAML."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"cannot read policy file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"policy file {path} is not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise UsageError(f"policy file {path} must hold a ProcessingPolicy or its spec")
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
        raise UsageError(f"no {flag.lstrip('-')} given: pass {flag} or set {variable}")
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
        help=f"PostgreSQL DSN of the entries' database (default: ${DSN_ENVIRONMENT_VARIABLE})",
    )


def cmd_sweep(args: argparse.Namespace, out: TextIO) -> int:
    policy = load_policy(args.policy, namespace=args.namespace)
    dsn = _secret_setting(args.dsn, DSN_ENVIRONMENT_VARIABLE, "--dsn")
    url = _secret_setting(args.broker, BROKER_ENVIRONMENT_VARIABLE, "--broker")
    db = reconcile.Database(dsn, application_name="celery-reconciler cli")
    publisher = broker_module.connect(url)
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
    return EXIT_OK


def add_subcommand(
    subparsers: Any, name: str, command: Command, *, help: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
    parser.set_defaults(command=command)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-reconciler",
        description="Make sure every unprocessed row of a table is processed by a Celery task.",
    )
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    sweep = add_subcommand(
        subparsers,
        "sweep",
        cmd_sweep,
        help="run one sweep: expire stale leases, claim pending entries, publish them",
    )
    add_policy_arguments(sweep)
    sweep.add_argument(
        "--broker", help=f"Celery broker URL (default: ${BROKER_ENVIRONMENT_VARIABLE})"
    )
    runner.add_run_command(
        add_subcommand(subparsers, "run", cmd_run, help="run the operator (kopf) until stopped")
    )
    return parser


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    return runner.run(runner.options_from_args(args))


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.command(args, stream)
        return code
    except (UsageError, policy_module.InvalidPolicy) as error:
        print(f"celery-reconciler: {error}", file=sys.stderr)
        return EXIT_USAGE
    except reconcile.SourceInvalid as error:
        print(f"celery-reconciler: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (reconcile.DatabaseUnavailable, reconcile.BrokerUnavailable) as error:
        print(f"celery-reconciler: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
