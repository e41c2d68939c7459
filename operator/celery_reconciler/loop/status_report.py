"""How a policy's loop shows what it did: the log, metrics, Events on a change of health,
and the two status objects (the policy's own status and its ProcessingStatus).

ProcessingStatus is a summary for people and dashboards: it is written when what it says
changes, but at most once a second (a burst of wake-ups must not become a burst of API
writes), and refreshed by the first report 5 minutes after the last write even when nothing
changed (lastSweepTime says the loop lives). An idle policy costs the API server that one
write, not one per sweep: with hundreds of policies, writes that say nothing new crowd out
those that do. The writes go out through the one status writer (``statuswriter``).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery_reconciler import conditions, ledger, metrics, reconcile, statuswriter
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import events as events_module

# Every per-policy line of the operator's log names the loop as its source (see problems).
logger = logging.getLogger("celery_reconciler.loop")

STATUS_MIN_INTERVAL_SECONDS = 1.0
STATUS_REFRESH_SECONDS = 300.0
# The same words after every sweep: a message that quoted the sweep's count would make
# every busy policy's conditions, and so its status, change on every sweep.
# ProcessingStatus carries the counts (lastDispatched).
HEALTHY_SUMMARY = "sweeps reach the database and the broker"

Condition = tuple[str, str, str, str]


def utc_now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusReporter:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        body: Mapping[str, Any],
        events: events_module.PolicyEvents,
        advice: Callable[[], tuple[Condition, ...]] = tuple,
        last_rescue: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.key = f"{namespace}/{name}"
        self.body = body  # kopf's live view: the status last written, before this loop's
        self.events = events
        # What other parts add to every status: advice conditions, the last rescue.
        self.advice = advice
        self.last_rescue = last_rescue
        self.last_problem: conditions.Problem | None = None
        self.last_status_write = 0.0
        # When the last sweep ended, written with every status write (see ``show_outcome``).
        self.last_sweep_time: str | None = None
        self.reported_facts: tuple[Any, ...] | None = None
        self.status_write_deferred = False
        self.submitted_conditions: list[dict[str, Any]] | None = None
        self.submitted_policy_status: tuple[int, list[dict[str, Any]]] | None = None
        self.last_counts: reconcile.StatusSnapshot | None = None
        self.outcomes_until: datetime.datetime | None = None
        self.dispatched_since_write = 0

    def deferred_write_in_seconds(self) -> float | None:
        """When a status write held back (at most one a second) is due; None if none is."""
        return STATUS_MIN_INTERVAL_SECONDS if self.status_write_deferred else None

    def work_in_flight(self) -> bool:
        return self.last_counts is not None and self.last_counts.in_flight > 0

    def count_outcomes(self, outcomes: ledger.Outcomes) -> None:
        """Advance the succeeded / retried / dead-lettered counters by what finished since
        the last read. The first read counts nothing and opens the window: counting the
        ledger's whole history made every operator start scan it once per policy, and a
        Prometheus counter starts at zero with its process anyway (``rate`` and
        ``increase`` expect that; a counter that began at the history's total would show
        one huge increase after each restart)."""
        self.outcomes_until = outcomes.until
        labels = (self.namespace, self.name)
        metrics.SUCCEEDED.labels(*labels).inc(outcomes.succeeded)
        metrics.RETRIED.labels(*labels).inc(outcomes.retried)
        metrics.DEAD_LETTERED.labels(*labels).inc(outcomes.dead_lettered)

    async def show_outcome(
        self,
        *,
        policy: policy_module.Policy | None,
        problem: conditions.Problem | None,
        generation: int,
        result: reconcile.SweepResult | None = None,
        counts: reconcile.StatusSnapshot | None = None,
    ) -> None:
        """Show one iteration's outcome: an Event when health changed, the sweep in the log
        and metrics, and the status when what it says changed (or is due a refresh)."""
        advice, last_rescue = self.advice(), self.last_rescue()
        changed = await self.tell_health_change(problem)
        if result is not None:
            self.note_sweep(result)
        if counts is not None:
            self.last_counts = counts
            record_count_metrics(self.namespace, self.name, counts)
        facts = (
            generation,
            problem,
            None if counts is None else status_counts(counts),
            self.dispatched_since_write,
            last_rescue,
            advice,
        )
        if not self.status_write_due(facts, health_changed=changed):
            return
        suspended = policy is not None and policy.schedule.suspend
        merged = self.merged_conditions(
            problem=problem, suspended=suspended, advice=advice, generation=generation
        )
        statuswriter.WRITER.submit(
            namespace=self.namespace,
            name=self.name,
            owner_uid=self.uid,
            policy_status=self.policy_status(generation=generation, merged=merged),
            processing=self.processing_status(
                generation=generation,
                merged=merged,
                counts=counts,
                swept=result is not None,
                last_rescue=last_rescue,
            ),
        )

    async def tell_health_change(self, problem: conditions.Problem | None) -> bool:
        """An Event (and a log line) when the problem changed; True when it did."""
        changed = problem != self.last_problem
        if changed and problem is not None:
            logger.warning("policy %s: %s: %s", self.key, problem.reason, problem.message)
            await self.events.post("Warning", problem.reason, problem.message)
        elif changed and self.last_problem is not None:
            await self.events.post("Normal", "Recovered", f"{self.last_problem.reason} resolved")
        self.last_problem = problem
        return changed

    def note_sweep(self, result: reconcile.SweepResult) -> None:
        # Kept even when this report writes nothing: a later write (the counts moved
        # between sweeps, a condition changed) then carries this sweep, not an older one.
        self.last_sweep_time = utc_now_text()
        self.dispatched_since_write += result.published
        record_sweep_metrics(self.namespace, self.name, result)
        # Hundreds of idle policies would write a line each per sweep, saying nothing.
        logger.log(
            logging.DEBUG if result.idle else logging.INFO,
            "policy %s: swept in %.3fs: dispatched %d in %d pages, lost workers %d, "
            "dead %d, lost messages %d",
            self.key,
            result.duration_seconds,
            result.published,
            result.pages,
            result.expired.retry_now,
            result.expired.dead,
            result.expired.unstarted + result.missing_messages,
            extra={"fields": sweep_fields(result)},
        )

    def status_write_due(self, facts: tuple[Any, ...], *, health_changed: bool) -> bool:
        """Whether to write now: what the status says changed (at most once a second, a
        write held back is remembered), or the refresh period passed."""
        since_write = time.monotonic() - self.last_status_write
        if (
            not health_changed
            and facts == self.reported_facts
            and since_write < STATUS_REFRESH_SECONDS
        ):
            return False
        if not health_changed and since_write < STATUS_MIN_INTERVAL_SECONDS:
            self.status_write_deferred = True
            return False
        self.status_write_deferred = False
        self.last_status_write = time.monotonic()
        self.reported_facts = facts
        return True

    def merged_conditions(
        self,
        *,
        problem: conditions.Problem | None,
        suspended: bool,
        advice: tuple[Condition, ...],
        generation: int,
    ) -> list[dict[str, Any]]:
        now = utc_now_text()
        # Merged with what this loop last submitted: the live body lags while the status
        # writer holds the patch, and a transition time must not move twice.
        previous = self.submitted_conditions
        if previous is None:
            previous = (self.body.get("status") or {}).get("conditions")
        updates = list(
            conditions.health(problem=problem, suspended=suspended, summary=HEALTHY_SUMMARY)
        )
        updates.extend(advice)
        merged = conditions.merge(previous, updates, now=now, generation=generation)
        self.submitted_conditions = merged
        return merged

    def policy_status(
        self, *, generation: int, merged: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """The policy's own status changes when its conditions or generation do; a sweep that
        changed nothing else is told by ProcessingStatus alone, one write instead of two."""
        if (generation, merged) == self.submitted_policy_status:
            return None
        self.submitted_policy_status = (generation, merged)
        status: dict[str, Any] = {"observedGeneration": generation, "conditions": merged}
        if self.last_sweep_time is not None:
            status["lastSweepTime"] = self.last_sweep_time
        return status

    def processing_status(
        self,
        *,
        generation: int,
        merged: list[dict[str, Any]],
        counts: reconcile.StatusSnapshot | None,
        swept: bool,
        last_rescue: dict[str, Any] | None,
    ) -> dict[str, Any]:
        processing: dict[str, Any] = {"policyGeneration": generation, "conditions": merged}
        if self.last_sweep_time is not None:
            processing["lastSweepTime"] = self.last_sweep_time
        if counts is not None:
            processing.update(status_counts(counts))
        if swept:
            # A deferred write must not lose what the sweeps before it dispatched.
            processing["lastDispatched"] = self.dispatched_since_write
            self.dispatched_since_write = 0
        if last_rescue is not None:
            processing["lastRescue"] = last_rescue
        return processing


def status_counts(counts: reconcile.StatusSnapshot) -> dict[str, Any]:
    """The ProcessingStatus counts. ``pending`` is what waits for dispatch: the unprocessed
    rows minus those in flight, waiting for a retry or dead, so the columns add up."""
    oldest = counts.oldest_pending_seconds
    waiting = counts.pending - counts.in_flight - counts.retrying - counts.dead
    return {
        "pending": max(0, waiting),
        "inFlight": counts.in_flight,
        "retrying": counts.retrying,
        "succeeded": counts.succeeded,
        "dead": counts.dead,
        "oldestPendingSeconds": None if oldest is None else int(oldest),
    }


def sweep_fields(result: reconcile.SweepResult) -> dict[str, Any]:
    return {
        "policy": result.policy_key,
        "dispatched": result.published,
        "pages": result.pages,
        "in_flight_before": result.in_flight_before,
        "lost_workers": result.expired.retry_now,
        "dead_on_expiry": result.expired.dead,
        "lost_messages": result.expired.unstarted + result.missing_messages,
        "settled": result.settled,
        "pruned_attempts": result.pruned.attempts,
        "pruned_entries": result.pruned.entries,
        "duration_seconds": round(result.duration_seconds, 4),
    }


def record_sweep_metrics(namespace: str, name: str, result: reconcile.SweepResult) -> None:
    metrics.DISPATCHED.labels(namespace, name).inc(result.published)


def record_count_metrics(namespace: str, name: str, counts: reconcile.StatusSnapshot) -> None:
    metrics.PENDING.labels(namespace, name).set(status_counts(counts)["pending"])
    metrics.IN_FLIGHT.labels(namespace, name).set(counts.in_flight)
    metrics.RETRYING.labels(namespace, name).set(counts.retrying)
    metrics.DEAD.labels(namespace, name).set(counts.dead)
    metrics.OLDEST_PENDING_SECONDS.labels(namespace, name).set(counts.oldest_pending_seconds or 0)
