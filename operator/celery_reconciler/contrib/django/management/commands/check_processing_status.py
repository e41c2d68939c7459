"""``manage.py check_processing_status`` under the deprecated app name (see its package)."""

from celery_reconciler.contrib.django_commands.management.commands import (
    check_processing_status as current,
)

Command = current.Command
