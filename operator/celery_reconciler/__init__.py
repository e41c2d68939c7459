"""celery-reconciler: a kopf operator that guarantees every unprocessed row is processed.

The package is layered like kopf itself: pure modules at the bottom (``policy`` parses a
ProcessingPolicy spec, ``planning`` makes every reconcile decision without I/O), one I/O
adapter per outside system beside them (``ledger`` and ``source`` for PostgreSQL,
``broker`` for Celery's broker, ``kube`` for the Kubernetes API), and thin kopf
``handlers`` on top that only wire those together.
"""
