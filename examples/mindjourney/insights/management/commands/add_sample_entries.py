"""``manage.py add_sample_entries N``: N journal entries, as users writing their journal."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from insights.models import JournalEntry

SAMPLE_BODIES = (
    "Slept well and went for a long run. Grateful for the sunshine, feeling great today!",
    "Work was stressful; the deadline moved again. Why does this keep happening?",
    "Called mum, cooked pasta, read two chapters. A calm and happy evening.",
    "Tired and anxious about the exam tomorrow. I should review the notes again.",
    "Team lunch was fun. Learned a new trick in Python and shipped the feature.",
)


class Command(BaseCommand):
    help = "Add sample journal entries; each is pending until its insights are extracted."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("count", type=int)

    def handle(self, *args: Any, count: int, **options: Any) -> None:
        JournalEntry.objects.bulk_create(
            JournalEntry(author=f"user{n % 7}", body=SAMPLE_BODIES[n % len(SAMPLE_BODIES)])
            for n in range(count)
        )
        self.stdout.write(f"added {count} journal entries")
