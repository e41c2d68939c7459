"""``PolicyLoop``: the coordinator of one policy's parts, one iteration after another.

Each iteration reads the live spec, asks whether the policy may sweep (``conflicts``),
resolves its Secrets (``connections``), carries out what was asked by annotation
(``annotation_requests``), runs what must be rescued (``rescues``, fed by ``pod_proofs``),
runs one sweep (``reconcile.reconcile_once``: expire, claim, publish), reads the progress,
checks its advice (``advice``), shows the outcome (``status_report``), and sleeps until the
next sweep (``schedule``). Any failure becomes a condition (``problems``) and a backed-off
retry, never a dead loop. The parts each keep their own state; this class only says in
which order they run, and is meant to stay short.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from celery_reconciler import (
    broker,
    conditions,
    ledger,
    metrics,
    planning,
    reconcile,
    sharding,
    statuswriter,
)
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import (
    advice,
    annotation_requests,
    conflicts,
    connections,
    events,
    pod_proofs,
    problems,
    rescues,
    schedule,
    status_report,
)

# Every per-policy line of the operator's log names the loop as its source (see problems).
logger = logging.getLogger("celery_reconciler.loop")


@dataclasses.dataclass(frozen=True)
class Swept:
    result: reconcile.SweepResult | None  # None while the policy is suspended
    counts: reconcile.StatusSnapshot


class PolicyLoop:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        body: Mapping[str, Any],
        peers: Mapping[str, Iterable[planning.PolicyClaim]] | None = None,
        fence: sharding.Fence | None = None,
        lease_backs: Callable[[sharding.Fence], Awaitable[bool]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.body = body  # kopf's live view: always the latest spec and annotations
        self.key = f"{namespace}/{name}"
        self.policy: policy_module.Policy | None = None
        self.failures_in_a_row = 0
        # Every ProcessingPolicy by namespace (a kopf index), to find the ones that overlap.
        self.peers = peers or {}
        # This replica's claim to the policy when replicas share the policies (membership).
        self.fence = fence
        # Whether the policy's Lease still names a fence (holder and token): asked when the
        # ledger's owner row refuses this replica (``conflicts.owner_disagreement``).
        self.lease_backs = lease_backs
        self.schedule = schedule.SweepSchedule(policy_key=self.key)
        self.connections = connections.Connections()
        self.events = events.PolicyEvents(namespace=namespace, name=name, uid=uid)
        self.errors = problems.ErrorTranslator(
            policy_key=self.key, secrets=self.connections.secrets
        )
        self.health = problems.HealthJudge()
        self.requests = annotation_requests.AnnotationRequests(
            namespace=namespace, name=name, body=body, events=self.events
        )
        self.advice = advice.PolicyAdvice(policy_key=self.key, events=self.events)
        self.rescues = rescues.RescueQueue(
            namespace=namespace,
            name=name,
            fence=fence,
            connections=self.connections,
            current_policy=lambda: self.policy,
            events=self.events,
            errors=self.errors,
            wake_loop=self.schedule.wake_now,
        )
        self.broker_restarts = rescues.BrokerRestarts(
            policy_key=self.key, events=self.events, wake_loop=self.schedule.wake_now
        )
        self.reporter = status_report.StatusReporter(
            namespace=namespace,
            name=name,
            uid=uid,
            body=body,
            events=self.events,
            advice=self.advice.conditions,
            last_rescue=self.last_rescue_status,
        )
        self.pod_proofs = pod_proofs.PodProofs(
            namespace=namespace, rescue_queue=self.rescues, waker=self.schedule.waker
        )

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stopped: Any) -> None:
        self.schedule.register()
        logger.info("policy %s: loop started", self.key)
        try:
            while not stopped:
                delay = await self.iterate()
                await self.schedule.wait_for_next_sweep(
                    delay,
                    stopped,
                    work_in_flight=self.reporter.work_in_flight,
                    refresh_status=self.refresh_status,
                )
        finally:
            await self.forget_work_if_deleted()
            self.schedule.unregister()
            conflicts.forget(self.key)
            self.pod_proofs.stop()
            statuswriter.WRITER.forget(namespace=self.namespace, name=self.name)
            self.connections.close()
            logger.info("policy %s: loop stopped", self.key)

    async def iterate(self) -> float:
        """One pass: returns how many seconds to sleep before the next one."""
        generation = self.generation()
        await self.requests.repair_diffbase()
        policy = await self.parse_spec(generation=generation)
        if policy is None:  # an edit of the spec wakes the loop at once (handlers)
            return schedule.INVALID_SPEC_RECHECK_SECONDS
        self.policy = policy
        conflict = conflicts.with_older_peer(policy, peers=self.peers)
        if conflict is not None:
            await self.reporter.show_outcome(policy=policy, problem=conflict, generation=generation)
            return policy.schedule.sweep_interval_seconds
        try:
            swept = await self.sweep(policy, generation=generation)
        except ledger.FencedOut as error:
            return await self.fenced_out(policy, error, generation=generation)
        except Exception as error:  # every failure is a condition, never a dead loop
            return await self.failed(policy, self.errors.problem_of(error), generation=generation)
        if swept is None:  # yielded to an older policy of the same database, and said so
            return policy.schedule.sweep_interval_seconds
        self.failures_in_a_row = 0
        await self.reporter.show_outcome(
            policy=policy,
            problem=self.health_problem(policy, swept.counts),
            generation=generation,
            result=swept.result,
            counts=swept.counts,
        )
        return self.schedule.next_sweep_in_seconds(
            policy,
            swept.counts,
            silent_worker_holds=self.pod_proofs.silent_held is not None,
            status_write_in_seconds=self.reporter.deferred_write_in_seconds(),
        )

    def generation(self) -> int:
        return int(self.body.get("metadata", {}).get("generation") or 0)

    async def parse_spec(self, *, generation: int) -> policy_module.Policy | None:
        """The live spec as a policy; None (and the problem shown) when it is invalid."""
        try:
            return policy_module.parse_policy(
                self.body.get("spec") or {}, namespace=self.namespace, name=self.name
            )
        except policy_module.InvalidPolicy as error:
            problem = conditions.Problem(conditions.INVALID_SPEC, str(error))
            metrics.SWEEP_ERRORS.labels(self.namespace, self.name, problem.reason).inc()
            await self.reporter.show_outcome(policy=None, problem=problem, generation=generation)
            return None

    async def sweep(self, policy: policy_module.Policy, *, generation: int) -> Swept | None:
        """The steps of one sweep, in order; None when the database names an older policy
        for these rows (this one yields, and has said so)."""
        dsn, broker_url = await asyncio.to_thread(self.read_secrets, policy)
        self.connections.use(
            dsn=dsn, broker_url=broker_url, transport_options=policy.task.transport_options()
        )
        db, publisher = self.connections.db, self.connections.publisher
        assert db is not None and publisher is not None
        conflict = await conflicts.in_database(
            policy, db=db, uid=self.uid, metadata=self.body.get("metadata", {})
        )
        if conflict is not None:
            self.pod_proofs.stop()  # its workers' rescues are the older policy's
            await self.reporter.show_outcome(policy=policy, problem=conflict, generation=generation)
            return None
        self.pod_proofs.follow(policy)
        await self.requests.retry_dead_if_asked(policy, db=db)
        await self.requests.sweep_now_done()
        await self.broker_restarts.notice(policy, db=db, publisher=publisher)
        await self.rescues.finish()
        result = None
        if not policy.schedule.suspend:
            result = await self.dispatch(policy, db=db, publisher=publisher)
        await self.pod_proofs.judge_silent_workers(policy, db=db)
        counts = await self.read_progress(policy, db=db, publisher=publisher)
        await self.advice.check_index(policy, db=db, generation=generation)
        return Swept(result=result, counts=counts)

    def read_secrets(self, policy: policy_module.Policy) -> tuple[str, str]:
        # A failing policy reads its Secrets afresh: its attempts are already spaced by the
        # error backoff, and a Secret just fixed must count at the next one, not 10 s later
        # (by then the backoff may have grown to a minute).
        return self.connections.read_secrets(
            policy, namespace=self.namespace, afresh=self.failures_in_a_row > 0
        )

    async def dispatch(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions, publisher: broker.Publisher
    ) -> reconcile.SweepResult:
        """``reconcile.reconcile_once`` within the policy's dispatch rate."""
        held = self.schedule.holds_dispatch(policy)
        result = await asyncio.to_thread(
            reconcile.reconcile_once,
            policy,
            db=db,
            broker=publisher,
            hold_dispatch=held,
            fence=self.fence,
        )
        if not held:
            self.schedule.dispatched(result)
        metrics.SWEEP_SECONDS.labels(self.namespace, self.name).observe(result.duration_seconds)
        return result

    async def read_progress(
        self,
        policy: policy_module.Policy,
        *,
        db: reconcile.Sessions,
        publisher: broker.Publisher,
    ) -> reconcile.StatusSnapshot:
        """Read what the status and the metrics show: counts, finished attempts, queue depth."""
        counts = await asyncio.to_thread(
            reconcile.collect_status, policy, db=db, outcomes_since=self.reporter.outcomes_until
        )
        self.reporter.count_outcomes(counts.outcomes)
        await self.advice.check_lease(policy, counts)
        depth = await asyncio.to_thread(publisher.queue_depth, policy.task.queue)
        metrics.QUEUE_DEPTH.labels(self.namespace, self.name).set(depth)
        return counts

    async def refresh_status(self) -> bool:
        """Between sweeps: the counts again, and the health a sweep that worked would show;
        True when what they show is due now (sweep instead of sleeping on)."""
        db, publisher, policy = self.connections.db, self.connections.publisher, self.policy
        if db is None or publisher is None or policy is None:
            return False
        last_problem = self.reporter.last_problem
        if last_problem is not None and last_problem.reason not in problems.HEALTH_REASONS:
            return False
        try:
            if await self.broker_restarts.notice(policy, db=db, publisher=publisher):
                return False  # the loop was woken to re-dispatch; it reports after that sweep
            counts = await self.read_progress(policy, db=db, publisher=publisher)
        except Exception:  # the next sweep meets it too, and reports it
            return False
        await self.reporter.show_outcome(
            policy=policy,
            problem=self.health_problem(policy, counts),
            generation=self.generation(),
            counts=counts,
        )
        return planning.sweep_early(
            seconds_until_next_due=counts.seconds_until_next_due,
            suspended=policy.schedule.suspend,
        )

    def health_problem(
        self, policy: policy_module.Policy, counts: reconcile.StatusSnapshot
    ) -> conditions.Problem | None:
        return self.health.problem(
            policy,
            counts,
            pod_watch_failure=self.pod_proofs.watch_failure,
            silent_held=self.pod_proofs.silent_held,
            broker_url=self.connections.broker_url,
        )

    def last_rescue_status(self) -> dict[str, Any] | None:
        last = self.rescues.last_rescue
        return None if last is None else last.as_status()

    async def failed(
        self, policy: policy_module.Policy, problem: conditions.Problem, *, generation: int
    ) -> float:
        """Show a sweep that failed; how long to back off before the next one."""
        metrics.SWEEP_ERRORS.labels(self.namespace, self.name, problem.reason).inc()
        await self.reporter.show_outcome(policy=policy, problem=problem, generation=generation)
        self.failures_in_a_row += 1
        return schedule.backoff_seconds(self.failures_in_a_row)

    async def fenced_out(
        self, policy: policy_module.Policy, refused: ledger.FencedOut, *, generation: int
    ) -> float:
        """The ledger refused this replica's fence: a takeover ends this loop (raised on to
        ``membership.serve``); a disagreement with the Lease is shown (``conflicts``)."""
        disagreement = await conflicts.owner_disagreement(
            refused, policy_key=self.key, fence=self.fence, lease_backs=self.lease_backs
        )
        if disagreement is None:
            raise refused  # another replica sweeps the policy now: this loop ends
        if refused.current is not None and refused.current.token < sharding.MAX_LEASE_TOKEN:
            # membership.serve takes the Lease over above the row's token: said once.
            await self.events.post("Warning", disagreement.reason, disagreement.message)
            raise refused
        # No Lease can carry that token: this replica keeps the Lease and the policy
        # shows why it is not swept, until someone removes the row.
        return await self.failed(policy, disagreement, generation=generation)

    async def forget_work_if_deleted(self) -> None:
        """A deleted policy leaves the rows it held to the policies that yielded to it."""
        db = self.connections.db
        if db is None or not self.body.get("metadata", {}).get("deletionTimestamp"):
            return
        try:
            await asyncio.to_thread(
                reconcile.forget_work, db, policy_key=self.key, policy_uid=self.uid
            )
        except Exception as error:  # the policies that yield check that it still exists
            logger.warning(
                "policy %s: could not remove its record of the rows it held: %s",
                self.key,
                self.errors.problem_of(error).message,
            )
