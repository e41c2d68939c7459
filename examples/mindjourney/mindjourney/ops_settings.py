"""Settings for an operations shell, where the full celery-reconciler package (its CLI) is
installed: the original app's ``check_processing_status`` and ``retry_unprocessed_entries
--run-now`` keep their names and call the CLI (``celery_reconciler.contrib.django_commands``).
Workers use ``mindjourney.settings``, which needs only the worker package.
"""

from mindjourney.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "celery_reconciler.contrib.django_commands"]  # noqa: F405
CELERY_RECONCILER_POLICY = "journal-insights"
CELERY_RECONCILER_NAMESPACE = "mindjourney"
