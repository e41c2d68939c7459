"""``manage.py retry_unprocessed_entries`` under the deprecated app name (see its package)."""

from celery_reconciler.contrib.django_commands.management.commands import (
    retry_unprocessed_entries as current,
)

Command = current.Command
