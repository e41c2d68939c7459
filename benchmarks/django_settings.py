"""Django settings of the worker benchmark's ``fenced_atomic`` form: one PostgreSQL database,
the ledger's, from ``CELERY_RECONCILER_DSN`` (as a user's settings would name it)."""

from __future__ import annotations

import os

from psycopg import conninfo

_database = conninfo.conninfo_to_dict(os.environ["CELERY_RECONCILER_DSN"])

SECRET_KEY = "celery-reconciler-bench"
INSTALLED_APPS: list[str] = []
USE_TZ = True
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _database.get("dbname", ""),
        "USER": _database.get("user", ""),
        "PASSWORD": _database.get("password", ""),
        "HOST": _database.get("host", ""),
        "PORT": _database.get("port", ""),
        # Persistent and checked before reuse, as the docs recommend a worker's settings:
        # without either, each task opens a connection (celery_reconciler_worker.django keeps
        # one only where Django checks it), which would time connecting, not the fenced commit.
        "CONN_MAX_AGE": None,
        "CONN_HEALTH_CHECKS": True,
    }
}
