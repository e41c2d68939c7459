"""The Celery side of celery-reconciler in the operator's distribution: the demo app, the faults
its bodies (and the chaos suite's) stage in their own process (``faults``), and the
deprecated ``celery_app.reliable`` alias. The integration users install is the package beside
them, ``celery_reconciler_worker``, a distribution of its own (``celery_app/pyproject.toml``)."""
