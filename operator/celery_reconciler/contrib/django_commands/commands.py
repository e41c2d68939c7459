"""What the management commands share: the policy they name and the CLI call."""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError

from celery_reconciler import cli


def add_policy_arguments(parser: argparse.ArgumentParser, *, policy: bool = True) -> None:
    if policy:
        parser.add_argument(
            "--policy",
            default=getattr(settings, "CELERY_RECONCILER_POLICY", None),
            help="the ProcessingPolicy (default: settings.CELERY_RECONCILER_POLICY)",
        )
    parser.add_argument(
        "-n",
        "--namespace",
        default=getattr(settings, "CELERY_RECONCILER_NAMESPACE", None),
        help="its namespace (default: settings.CELERY_RECONCILER_NAMESPACE, else the "
        "kubeconfig context's)",
    )


def policy_name(options: dict[str, object]) -> str:
    name = options.get("policy")
    if not name:
        raise CommandError("name the ProcessingPolicy: --policy or CELERY_RECONCILER_POLICY")
    return str(name)


def namespace_arguments(options: dict[str, object]) -> list[str]:
    namespace = options.get("namespace")
    return ["-n", str(namespace)] if namespace else []


def run_cli(argv: list[str], *, stdout: Any) -> None:
    """``celery-reconciler ARGV``, its output on the command's stdout; a failure is a
    ``CommandError`` with the CLI's exit code (its message is already on stderr)."""
    out = io.StringIO()
    code = cli.main(argv, out=out)
    stdout.write(out.getvalue(), ending="")  # a Django OutputWrapper
    if code != cli.EXIT_OK:
        sys.stderr.flush()
        raise CommandError(f"celery-reconciler {argv[0]} failed", returncode=code)
