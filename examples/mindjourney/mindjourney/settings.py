"""Settings of the mindjourney example, read from the environment as a deployment sets them.

``DATABASE_URL`` (``postgresql://user:password@host:5432/dbname``) is the one database: the
journal entries, and the ledger celery-reconciler keeps beside them (schema
``celery_reconciler``), reached through Django's own connection. ``CELERY_BROKER_URL`` is
the broker. ``INSIGHTS_MODEL_SECONDS`` stands in for the time the original app's language
model call took.
"""

import os

from django.core.exceptions import ImproperlyConfigured
from psycopg import conninfo

DEBUG = False
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "mindjourney-example-not-a-secret")
ALLOWED_HOSTS: list[str] = []
INSTALLED_APPS = ["insights"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if not os.environ.get("DATABASE_URL"):
    raise ImproperlyConfigured(
        "DATABASE_URL is not set: postgresql://user:password@host:5432/dbname of the app's database"
    )
_database = conninfo.conninfo_to_dict(os.environ["DATABASE_URL"])
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _database.get("dbname", ""),
        "USER": _database.get("user", ""),
        "PASSWORD": _database.get("password", ""),
        "HOST": _database.get("host", ""),
        "PORT": _database.get("port", ""),
        # A worker process keeps its connection between tasks, checked before each reuse:
        # the fence check and the body then cost no new connection.
        "CONN_MAX_AGE": 600,
        "CONN_HEALTH_CHECKS": True,
    }
}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
CELERY_TASK_DEFAULT_QUEUE = "insights"
# Outcomes live in the ledger (and in the journal_entry table): no result backend.
CELERY_TASK_IGNORE_RESULT = True

INSIGHTS_MODEL_SECONDS = float(os.environ.get("INSIGHTS_MODEL_SECONDS", "0"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}
