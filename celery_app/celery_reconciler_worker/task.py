"""The fenced task base class (``ReconciledTask``) and the fenced commit of a body's writes.

``ReconciledTask`` claims each attempt in the ledger before the body runs (the delivery's
task id must be the entry's current fence token, under this process's live incarnation),
counts the body as running for the watchdog and guardian, and records the outcome.
``fenced_transaction`` (and ``fenced_commit`` for a framework's transaction) commit a body's
writes together with its done mark, or neither.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import celery
import celery.exceptions
import psycopg

from celery_reconciler_worker import backoff, connection, identity, incarnation, ledger

logger = logging.getLogger(__name__)

# How long a worker waits before handing a delivery back when the ledger is unreachable.
REQUEUE_PAUSE_SECONDS = 2.0


class FenceLost(RuntimeError):
    """The attempt no longer owns its entry: ``fenced_transaction`` rolled the body back."""


@dataclasses.dataclass
class _CurrentAttempt:
    attempt: ledger.RunningAttempt
    recorded: bool = False


_current_attempt: contextvars.ContextVar[_CurrentAttempt | None] = contextvars.ContextVar(
    "celery_reconciler_attempt", default=None
)


@contextlib.contextmanager
def fenced_transaction(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Commit the body's writes and the done mark together, or neither: exactly-once effects
    for work in the same database as the ledger.

    Use it around the body's final writes, on the body's own psycopg connection::

        with reliable.fenced_transaction(conn):
            conn.execute("INSERT INTO insights ...")
            conn.execute("UPDATE journal_entry SET insights_extracted = true ...")

    Before the commit it marks the attempt succeeded inside the same transaction; that UPDATE
    locks the entry's ledger row and matches only while the attempt still owns it (its fence
    token, state ``running``). If the operator already handed the entry to another attempt,
    nothing matches: the whole transaction rolls back and ``FenceLost`` is raised (the task
    then ends quietly). An operator that comes later waits for the row lock and finds the
    entry succeeded. Outside this helper a body's effects are at-least-once.
    """
    current = _current_attempt.get()
    if current is None:
        raise RuntimeError("fenced_transaction is for the body of a ReconciledTask delivery")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        # Inside the caller's open transaction this would only be a savepoint, and the done
        # mark would wait for a commit that may never come.
        raise RuntimeError(
            "fenced_transaction needs a connection outside any transaction (commit or roll "
            "back first, or use an autocommit connection): it must own the commit"
        )
    committing = False
    try:
        # The done mark and the COMMIT go out in one round trip (pipeline mode, where libpq
        # has it): the transaction queues its COMMIT behind the mark, and leaving the
        # pipeline sends both. A lost fence fails the mark, so the COMMIT commits nothing.
        with contextlib.ExitStack() as one_round_trip, conn.transaction():
            yield conn
            committing = True
            if psycopg.Pipeline.is_supported():
                one_round_trip.enter_context(conn.pipeline())
            ledger.record_success_or_abort(conn, fence_token=current.attempt.fence_token)
    except ledger.FENCE_LOST_ABORT:
        if not committing:
            raise  # the body's own statement failed
        # In a pipeline the COMMIT behind the failed mark was skipped: end the aborted
        # transaction (without one, rollback() sends nothing).
        conn.rollback()
        raise FenceLost(
            f"entry {current.attempt.entry_id}: attempt {current.attempt.attempt} lost its "
            "fence before committing; its writes were rolled back"
        ) from None
    current.recorded = True


@contextlib.contextmanager
def fenced_commit(
    *,
    transaction: contextlib.AbstractContextManager[Any],
    connection: Callable[[], psycopg.Connection[Any]],
) -> Iterator[None]:
    """``fenced_transaction`` for a transaction that a framework begins and commits (say
    Django's ``transaction.atomic()``): the done mark is written on ``connection()`` — the
    connection ``transaction`` runs on, asked for once the transaction is open — just before
    ``transaction`` commits, and ``FenceLost`` rolls everything back."""
    current = _current_attempt.get()
    if current is None:
        raise RuntimeError("a fenced commit is for the body of a ReconciledTask delivery")
    with transaction:
        yield
        if not ledger.record_success(connection(), fence_token=current.attempt.fence_token):
            raise FenceLost(
                f"entry {current.attempt.entry_id}: attempt {current.attempt.attempt} lost its "
                "fence before committing; its writes were rolled back"
            )
    current.recorded = True


def record_failed_attempt(attempt: ledger.RunningAttempt, error: BaseException) -> str | None:
    """Schedule the retry (policy backoff with jitter) or dead-letter; returns the new state."""
    retry: backoff.Retry = connection.ledger_call(
        "reading the retry rules", ledger.retry_rules, policy_key=attempt.policy_key
    )
    decision = backoff.after_failure(attempt=attempt.attempt, retry=retry)
    retry_in = decision.delay_seconds if isinstance(decision, backoff.RetryLater) else None
    state: str | None = connection.ledger_call(
        "recording a failed attempt",
        ledger.record_failure,
        fence_token=attempt.fence_token,
        error=connection.describe_error(error),
        retry_in_seconds=retry_in,
    )
    return state


class ReconciledTask(celery.Task):  # type: ignore[misc]
    """A Celery task whose body runs at most once at a time per entry, fenced by the ledger.

    The first positional argument is the entry id (as the operator sends it). Use it as
    ``@app.task(base=ReconciledTask, name=...)``.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            # A plain Python call (``extract(entry_id)`` in a shell or a unit test) is not a
            # delivery: there is no fence to check and nothing to record.
            return super().__call__(*args, **kwargs)
        entry_id = str(args[0]) if args else str(kwargs.get("entry_id"))
        fence_token = str(self.request.id)
        try:
            attempt, incarnation_id = self._start(entry_id=entry_id, fence_token=fence_token)
        except connection.LedgerUnavailable as error:
            # Without the fence check the body must not run, but the delivery must not be
            # spent either: back into the queue, so it runs as soon as the database is back
            # instead of after the lease. The pause keeps a worker from spinning meanwhile.
            logger.warning(
                "entry %s: %s; returning the delivery to the queue in %.0f s",
                entry_id,
                error,
                REQUEUE_PAUSE_SECONDS,
            )
            time.sleep(REQUEUE_PAUSE_SECONDS)
            raise celery.exceptions.Reject(str(error), requeue=True) from None
        if attempt is None:
            logger.info(
                "dropped a stale delivery of entry %s (task id %s is not the entry's current "
                "fence token, or the entry is no longer queued): the body did not run",
                entry_id,
                fence_token,
            )
            return None
        current = _CurrentAttempt(attempt)
        token = _current_attempt.set(current)
        try:
            with incarnation.current.running_a_body(incarnation=incarnation_id):
                result = super().__call__(*args, **kwargs)
        except FenceLost as error:
            logger.warning("%s", error)
            return None
        except Exception as error:
            try:
                state = record_failed_attempt(attempt, error)
            except connection.LedgerUnavailable as unrecorded:
                incarnation.current.outcome_unrecorded(attempt.fence_token)
                logger.warning(
                    "entry %s attempt %d failed and its failure could not be recorded (%s); "
                    "the next heartbeat hands it back to the operator",
                    entry_id,
                    attempt.attempt,
                    unrecorded,
                )
                raise error from None
            logger.warning(
                "entry %s attempt %d failed (%s); ledger state now %s",
                entry_id,
                attempt.attempt,
                type(error).__name__,
                state or "unchanged: the lease was lost",
            )
            raise
        finally:
            _current_attempt.reset(token)
        if not current.recorded:
            # Marked succeeded in a batch by the next heartbeat (see ``ledger._MARK_FINISHED``):
            # the fence check stays the only ledger statement a task costs.
            incarnation.current.body_succeeded(attempt.fence_token)
        return result

    def _start(
        self, *, entry_id: str, fence_token: str
    ) -> tuple[ledger.RunningAttempt | None, uuid.UUID]:
        """The fence check under this process's live incarnation (and that incarnation). A
        refusal caused by the incarnation itself (ended, or not renewed in time) registers
        again and asks once more, so a valid delivery is never dropped for it."""
        for _ in range(2):
            incarnation_id = incarnation.current.ready_for_a_body()
            attempt: ledger.RunningAttempt | None = connection.ledger_call(
                "checking the fence token",
                ledger.start_attempt,
                fence_token=fence_token,
                entry_id=entry_id,
                worker=identity.worker_name(),
                incarnation=incarnation_id,
                heartbeat_timeout_seconds=incarnation.current.timeout_seconds,
            )
            if attempt is not None or connection.ledger_call(
                "checking the worker incarnation",
                ledger.incarnation_is_live,
                incarnation=incarnation_id,
            ):
                return attempt, incarnation_id
            incarnation.current.register_again(instead_of=incarnation_id)
        return None, incarnation_id
