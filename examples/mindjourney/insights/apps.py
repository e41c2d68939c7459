"""The insights app. Its ``ready()`` no longer runs a startup check (``RUN_STARTUP_CHECK``):
the operator sweeps when it starts and rescues what a restarted worker held."""

from django.apps import AppConfig


class InsightsConfig(AppConfig):
    name = "insights"
