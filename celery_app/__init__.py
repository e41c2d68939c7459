"""The Celery side of celery-reconciler: the integration users add to their app, and the demo."""
