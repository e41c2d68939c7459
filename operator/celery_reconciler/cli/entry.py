"""The entry point: the parser of every verb, in the order ``--help`` lists them, and how a
verb's failure becomes an exit code and one line on stderr (never a traceback or a secret).
``run`` starts the operator itself (``runner``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from celery_reconciler import broker as broker_module
from celery_reconciler import kube, ledger, reconcile, runner
from celery_reconciler import policy as policy_module
from celery_reconciler.cli import (
    conventions,
    explain,
    grants,
    operator_requests,
    show_status,
    sweep,
)
from celery_reconciler.loop import problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-reconciler",
        description="Make sure every unprocessed row of a table is processed by a Celery task.",
    )
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    sweep.add_command(subparsers)
    runner.add_run_command(
        conventions.add_subcommand(
            subparsers, "run", cmd_run, help="run the operator (kopf) until stopped"
        )
    )
    show_status.add_command(subparsers)
    operator_requests.add_sweep_now_command(subparsers)
    operator_requests.add_retry_dead_command(subparsers)
    explain.add_command(subparsers)
    grants.add_command(subparsers)
    return parser


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    return runner.run(runner.options_from_args(args))


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    parser = build_parser()
    parser.prog = conventions.prog_name()
    args = parser.parse_args(argv)
    try:
        code: int = args.command(args, stream)
        return code
    except (
        conventions.UsageError,
        policy_module.InvalidPolicy,
        reconcile.SourceInvalid,
        reconcile.DsnInvalid,
        reconcile.LedgerPermissionDenied,
        broker_module.BrokerUrlInvalid,
        kube.KubeconfigInvalid,
        kube.SecretNotFound,
        kube.SecretInvalid,
    ) as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return conventions.EXIT_USAGE
    except (
        reconcile.DatabaseUnavailable,
        reconcile.BrokerUnavailable,
        kube.KubernetesUnavailable,
    ) as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return conventions.EXIT_UNAVAILABLE
    except Exception as error:  # a bug: the operator's message, no traceback, no secret
        problem = problems.problem_of(error, secrets=_secrets_given(args))
        print(f"{parser.prog}: {problem.reason}: {problem.message}", file=sys.stderr)
        return conventions.EXIT_UNAVAILABLE


def _secrets_given(args: argparse.Namespace) -> tuple[str, ...]:
    """Every DSN and broker URL this command could have used, and their passwords."""
    found: tuple[str, ...] = ()
    for dsn in (getattr(args, "dsn", None), os.environ.get(conventions.DSN_ENVIRONMENT_VARIABLE)):
        if dsn:
            found += ledger.dsn_secrets(dsn)
    for url in (
        getattr(args, "broker", None),
        os.environ.get(conventions.BROKER_ENVIRONMENT_VARIABLE),
    ):
        if url:
            found += broker_module.url_secrets(url)
    return found
