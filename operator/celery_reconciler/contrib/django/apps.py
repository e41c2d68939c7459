"""The deprecated name's app configuration: the same label and commands as the new one."""

from celery_reconciler.contrib.django_commands import apps


class CeleryReconcilerConfig(apps.CeleryReconcilerConfig):
    name = "celery_reconciler.contrib.django"
