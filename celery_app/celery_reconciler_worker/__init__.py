"""celery-reconciler's worker side: what a Celery worker image installs to run reconciled tasks.

``from celery_reconciler_worker import reliable`` gives the fenced task base class
(``reliable.ReconciledTask``), ``reliable.fenced_transaction`` and
``reliable.recommended_settings``. The import name is distinct from ``celery_app`` on
purpose: many Celery projects have a top-level ``celery_app.py`` of their own.

The distribution is ``celery-reconciler-worker`` (``celery_app/pyproject.toml``): celery and
psycopg only. ``ledger`` holds every statement a worker runs and the schema both sides share;
``backoff`` the retry rule. The operator imports both, never the reverse — and its pure
``policy`` imports ``backoff``, so this package's ``__init__`` stays free of imports.

What runs in a worker, one job per module: ``task`` (the task base, the fenced commit),
``incarnation`` (registration, heartbeat), ``watchdog`` (the in-process self-fence),
``guardian`` and ``ticks`` (stopping from outside a process that cannot stop itself),
``probe`` (the container's liveness probe), ``identity`` (which container a process runs
in), ``connection`` (the ledger connection), ``settings`` and ``lifecycle`` (Celery settings
and signal handlers); ``reliable`` gathers the public names.
"""
