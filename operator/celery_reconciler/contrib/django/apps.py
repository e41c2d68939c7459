"""The app's configuration: a label of its own (the last part of its name is ``django``)."""

from django.apps import AppConfig


class CeleryReconcilerConfig(AppConfig):  # type: ignore[misc]
    name = "celery_reconciler.contrib.django"
    label = "celery_reconciler"
    verbose_name = "celery-reconciler"
