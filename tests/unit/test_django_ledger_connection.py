"""``celery_reconciler_worker.django``: the conninfo its own connections get from Django.

The heartbeat thread and the worker's main process connect with the parameters Django builds
from ``settings.DATABASES`` — every libpq parameter kept (``OPTIONS`` such as ``sslmode``
among them), Django's psycopg-only arguments dropped. Run in a child interpreter: importing
the module makes Django's connection the ledger connection of the whole process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from psycopg import conninfo

PROBE = textwrap.dedent(
    """
    import json
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "mindjourney",
                "USER": "app",
                "PASSWORD": "s3cret with spaces",
                "HOST": "db.internal",
                "PORT": "6432",
                "OPTIONS": {"sslmode": "require", "server_side_binding": True},
            }
        },
        USE_TZ=True,
    )
    django.setup()
    from celery_reconciler_worker import django as reliable_django, reliable

    dsn = reliable_django.DjangoLedgerConnection().dsn()
    error = RuntimeError("authentication failed for s3cret with spaces")
    print(json.dumps({"dsn": dsn, "described": reliable.describe_error(error)}))
    """
)


def test_the_heartbeats_conninfo_is_djangos_database_with_its_options() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert conninfo.conninfo_to_dict(found["dsn"]) == {
        "dbname": "mindjourney",
        "user": "app",
        "password": "s3cret with spaces",
        "host": "db.internal",
        "port": "6432",
        "sslmode": "require",
        "client_encoding": "UTF8",
    }
    # Importing the module installed it: errors recorded in the ledger hide its password.
    assert found["described"] == "RuntimeError: authentication failed for ***"
