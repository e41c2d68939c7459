"""What every verb of the command shares: its exit codes, the error that means "change your
input", the environment variables that stand in for flags, and the program's own name.

Exit codes: 0 done; 1 a component is unavailable (the cluster, the database, the broker;
retry later) or an unexpected error (a bug, reported without a traceback); 2 bad usage, an
invalid policy, a Secret or DSN that is not what it should be, missing rights, or something
named that does not exist.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

DSN_ENVIRONMENT_VARIABLE = "CELERY_RECONCILER_DSN"


BROKER_ENVIRONMENT_VARIABLE = "CELERY_BROKER_URL"


EXIT_OK = 0


EXIT_UNAVAILABLE = 1


EXIT_USAGE = 2


Command = Callable[[argparse.Namespace, TextIO], int]


class UsageError(Exception):
    """Bad input from the user; the message says what to change."""


def prog_name() -> str:
    invoked_as = Path(sys.argv[0]).name if sys.argv else ""
    return "kubectl celery-reconciler" if invoked_as.startswith("kubectl-") else "celery-reconciler"


def add_subcommand(
    subparsers: Any, name: str, command: Command, *, help: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
    parser.set_defaults(command=command)
    return parser
