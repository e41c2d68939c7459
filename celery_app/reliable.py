"""Deprecated import path, kept for one release: use ``celery_reconciler_worker.reliable``.

``celery_app`` collides with the top-level ``celery_app.py`` many Celery projects already
have (``celery -A celery_app worker``), so the worker integration moved to a package with a
distinct name. This module *is* the new one (same object in ``sys.modules``), so settings,
signal handlers and monkeypatches seen through either name are the same.
"""

import sys
import warnings

from celery_reconciler_worker import reliable as _reliable

warnings.warn(
    "celery_app.reliable is deprecated and will be removed in the next release; "
    "import celery_reconciler_worker.reliable instead",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _reliable
