"""The mindjourney project: journal entries whose insights a Celery task extracts."""

# Django's Celery convention: the app is loaded with the project, so @shared_task binds to it.
from mindjourney.celery import app as celery_app

__all__ = ("celery_app",)
