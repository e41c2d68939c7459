"""When a sweep reads the whole queue to account for every queued entry's message."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from celery_reconciler import planning

INTERVAL = 60.0


def needed(
    audit: planning.QueueAudit | None, *, queued: int = 10, held: int = 10, now: float = 100.0
) -> bool:
    return planning.queue_audit_needed(
        audit=audit, queued_a_while=queued, messages_held=held, now=now, interval_seconds=INTERVAL
    )


def test_every_message_counted_and_read_recently_needs_no_read() -> None:
    assert not needed(planning.QueueAudit(last_at=90.0), held=12)


def test_fewer_messages_than_entries_waiting_for_one_is_read_at_once() -> None:
    assert needed(planning.QueueAudit(last_at=99.0), queued=10, held=9)


def test_the_first_look_of_a_process_reads_it() -> None:
    assert needed(None)


def test_nothing_waiting_needs_no_read() -> None:
    assert not needed(None, queued=0, held=0)


def test_the_queue_is_read_at_the_interval() -> None:
    assert not needed(planning.QueueAudit(last_at=100.0 - INTERVAL + 1))
    assert needed(planning.QueueAudit(last_at=100.0 - INTERVAL))


def test_a_worker_that_ended_makes_a_read_due_from_then_on() -> None:
    audit = planning.queue_audit_due(planning.QueueAudit(last_at=99.0), at=102.0)
    assert audit is not None
    assert not needed(audit, now=101.0)
    assert needed(audit, now=102.0)
    # A read before the due time leaves it due; the one at or after it clears it.
    early = planning.queue_audit_done(audit, now=101.0)
    assert early.due_at == 102.0 and needed(early, now=102.0)
    done = planning.queue_audit_done(audit, now=102.0)
    assert done.due_at is None and not needed(done, now=103.0)


def test_an_earlier_due_time_wins() -> None:
    audit = planning.queue_audit_due(planning.QueueAudit(last_at=1.0, due_at=5.0), at=9.0)
    assert audit == planning.QueueAudit(last_at=1.0, due_at=5.0)
    assert planning.queue_audit_due(None, at=9.0) is None  # the first sweep reads anyway


@given(
    queued=st.integers(1, 1000),
    missing=st.integers(1, 1000),
    last_at=st.floats(0, 100),
    now=st.floats(0, 200),
)
def test_a_count_that_shows_a_loss_is_always_read(
    queued: int, missing: int, last_at: float, now: float
) -> None:
    audit = planning.QueueAudit(last_at=last_at)
    assert needed(audit, queued=queued, held=max(0, queued - missing), now=now)
