"""``JournalEntry``, the table the ProcessingPolicy reads, and ``InsightsRevision``.

An entry is unprocessed while ``insights_extracted`` is false: the policy's predicate. The
partial index on pending rows keeps each sweep's cost proportional to the backlog.
``InsightsRevision`` keeps every extraction's result — an append-only effect, the kind a
second run of the task would duplicate, so counting its rows shows exactly-once effects.
"""

from django.db import models
from django.utils import timezone


class JournalEntry(models.Model):
    author = models.CharField(max_length=150)
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    insights = models.JSONField(null=True, blank=True)
    insights_extracted = models.BooleanField(default=False)

    class Meta:
        db_table = "journal_entry"
        indexes = [
            models.Index(
                fields=["created_at", "id"],
                condition=models.Q(insights_extracted=False),
                name="journal_entry_pending",
            )
        ]

    def __str__(self) -> str:
        return f"journal entry {self.pk} by {self.author}"


class InsightsRevision(models.Model):
    entry = models.ForeignKey(JournalEntry, on_delete=models.CASCADE, related_name="revisions")
    insights = models.JSONField()
    task_id = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "insights_revision"
