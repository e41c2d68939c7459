"""A Django app that keeps the original app's management command names for the CLI.

Add ``"celery_reconciler.contrib.django_commands"`` to ``INSTALLED_APPS`` where the full
celery-reconciler package is installed (an operations shell, not the worker image), and
``check_processing_status`` and ``retry_unprocessed_entries --run-now`` call the same code as
``celery-reconciler status`` and ``celery-reconciler sweep-now --wait``: they ask the
operator through the Kubernetes API (credentials found as kubectl finds them) and never
dispatch themselves, so the one active operator stays the only dispatcher. The policy and
its namespace come from the settings ``CELERY_RECONCILER_POLICY`` and
``CELERY_RECONCILER_NAMESPACE`` or from ``--policy`` and ``--namespace``.
"""
