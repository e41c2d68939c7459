"""``manage.py check_processing_status``: ``celery-reconciler status``, under the old name.

``--retry-unprocessed`` asks the operator to run the policy's dead-lettered entries again
(``celery-reconciler retry-dead --wait``): entries merely unprocessed need nothing, every
sweep dispatches what is pending and not in flight.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from celery_reconciler.contrib.django_commands import commands


class Command(BaseCommand):  # type: ignore[misc]
    help = "Pending, in flight, retrying, succeeded and dead entries of the ProcessingPolicies."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        commands.add_policy_arguments(parser)
        parser.add_argument("-A", "--all-namespaces", action="store_true")
        parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
        parser.add_argument(
            "--retry-unprocessed",
            action="store_true",
            help="first run the policy's dead-lettered entries again",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["retry_unprocessed"]:
            commands.run_cli(
                [
                    "retry-dead",
                    commands.policy_name(options),
                    *commands.namespace_arguments(options),
                    "--wait",
                ],
                stdout=self.stdout,
            )
        where = ["-A"] if options["all_namespaces"] else commands.namespace_arguments(options)
        commands.run_cli(["status", *where, "-o", options["output"]], stdout=self.stdout)
