"""``manage.py retry_unprocessed_entries --run-now``: ``celery-reconciler sweep-now --wait``.

The operator sweeps: it dispatches what is pending and not in flight, so nothing already
running is queued twice. ``--setup-periodic`` is gone: the ProcessingPolicy's
``spec.schedule.sweepInterval`` is the period.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from celery_reconciler.contrib.django_commands import commands


class Command(BaseCommand):  # type: ignore[misc]
    help = "Ask the operator to sweep the ProcessingPolicy now and wait for its report."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        commands.add_policy_arguments(parser)
        parser.add_argument("--run-now", action="store_true", required=True)
        parser.add_argument("--setup-periodic", action="store_true", help=argparse.SUPPRESS)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["setup_periodic"]:
            raise CommandError(
                "--setup-periodic is gone: the ProcessingPolicy sweeps every "
                "spec.schedule.sweepInterval (kubectl apply it); --run-now asks for a sweep now"
            )
        commands.run_cli(
            [
                "sweep-now",
                commands.policy_name(options),
                *commands.namespace_arguments(options),
                "--wait",
            ],
            stdout=self.stdout,
        )
