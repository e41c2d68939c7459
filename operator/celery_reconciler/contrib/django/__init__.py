"""Deprecated name of ``celery_reconciler.contrib.django_commands``, kept for one release.

It read like the worker package's ``celery_reconciler_worker.django`` (``fenced_atomic``),
which is what a worker's app installs; this one only gives an operations shell the original
management command names. Replace ``"celery_reconciler.contrib.django"`` in
``INSTALLED_APPS`` by ``"celery_reconciler.contrib.django_commands"``.
"""

import warnings

warnings.warn(
    "celery_reconciler.contrib.django is renamed celery_reconciler.contrib.django_commands "
    "(INSTALLED_APPS); the old name goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
