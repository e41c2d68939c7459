"""``extract_insights_task``: the original task, minus what celery-reconciler replaces.

Gone: ``autoretry_for``, ``default_retry_delay``, ``max_retries`` and ``retry_jitter`` (the
policy's ``spec.retry``), and the ``retry_unprocessed_entries`` task that beat ran every 5
minutes (the policy's sweep). The base class checks the fence before the body runs;
``fenced_atomic`` commits the ORM writes and the done mark together, so a worker killed
anywhere in the body leaves either nothing or everything, never a write without its mark.
"""

from celery import shared_task

from celery_reconciler_worker import django as reliable_django
from insights.analysis import derive_insights
from insights.models import InsightsRevision, JournalEntry


@shared_task(
    bind=True, base=reliable_django.ReconciledTask, name="insights.tasks.extract_insights_task"
)
def extract_insights_task(self: reliable_django.ReconciledTask, entry_id: str) -> None:
    entry = JournalEntry.objects.get(pk=int(entry_id))  # the operator sends the id as text
    insights = derive_insights(entry.body)
    with reliable_django.fenced_atomic():
        entry.insights = insights
        entry.insights_extracted = True
        entry.save(update_fields=["insights", "insights_extracted"])
        InsightsRevision.objects.create(entry=entry, insights=insights, task_id=self.request.id)
