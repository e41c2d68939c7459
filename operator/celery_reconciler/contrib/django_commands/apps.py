"""The app's configuration: the label ``celery_reconciler`` (its commands keep the original
app's names)."""

from django.apps import AppConfig


class CeleryReconcilerConfig(AppConfig):  # type: ignore[misc]
    name = "celery_reconciler.contrib.django_commands"
    label = "celery_reconciler"
    verbose_name = "celery-reconciler"
