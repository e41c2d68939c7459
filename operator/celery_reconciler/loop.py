"""The per-policy control loop that replaces celery beat, and its pod-restart hook.

One ``PolicyLoop`` runs per ProcessingPolicy, inside a kopf daemon. Each iteration reads the
live spec, resolves the Secrets, runs one sweep (``reconcile.reconcile_once``: expire, claim,
publish), then reports — ProcessingStatus, conditions, Events, metrics — and sleeps until the
next sweep is due, a scheduled retry falls due, or something wakes it: a spec change, the
sweep-now or retry-dead annotation, or a rescue that must be reported.

The pod-restart hook turns each pod event into the worker incarnations it proves dead
(``planning.pod_ending``: by pod uid, never by name or by absence from a listing) and runs
``reconcile.rescue`` at once; a rescue that fails (the database is away) is kept and retried
with backoff, and by every sweep, until it succeeds.

Why a daemon and not a kopf timer: a timer's interval is fixed at decoration time, while
ours follows ``spec.schedule.sweepInterval`` and the earliest due retry, must be woken early
by other handlers, and backs off on its own when the database or broker is down (a
condition and an Event, never a crash loop). The loop also subscribes to the pod watch of
its policy's workers (``podwatch``, one per selector however many policies share it), and
leaves it when the policy is deleted. Its database connections are borrowed per sweep from
those the operator shares per database (``pools``); its status goes out through the one
status writer (``statuswriter``).

All blocking I/O (psycopg, redis, the Kubernetes client) runs in threads via
``asyncio.to_thread``; the loop itself only decides when to do what.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import logging
import operator
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from celery_reconciler import (
    broker,
    conditions,
    kube,
    ledger,
    metrics,
    overlaps,
    planning,
    podwatch,
    policy_annotations,
    pools,
    publishers,
    reconcile,
    sharding,
    statuswriter,
)
from celery_reconciler import policy as policy_module

SWEEP_NOW_ANNOTATION = policy_annotations.SWEEP_NOW
RETRY_DEAD_ANNOTATION = policy_annotations.RETRY_DEAD
# ProcessingStatus is a summary for people and dashboards: it is written when what it says
# changes, but at most once a second (a burst of wake-ups must not become a burst of API
# writes), and refreshed by the first report 5 minutes after the last write even when
# nothing changed (lastSweepTime says the loop lives). An idle policy costs the API server
# that one write, not one per sweep: with hundreds of policies, writes that say nothing new
# crowd out those that do.
STATUS_MIN_INTERVAL_SECONDS = 1.0
STATUS_REFRESH_SECONDS = 300.0
STATUS_LIVE_REFRESH_SECONDS = 2.0
ERROR_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
INVALID_SPEC_RECHECK_SECONDS = 300.0
# The pending query's plan is read at the first sweep of each generation, then hourly: an
# index created (or dropped) by a person shows within the hour, and asking costs one EXPLAIN.
INDEX_ADVICE_RECHECK_SECONDS = 3600.0

logger = logging.getLogger(__name__)

# Wake-up events of the running loops by policy key, for handlers that must poke a loop.
_WAKERS: dict[str, asyncio.Event] = {}
# Loops that yield to an older policy; any policy change in their namespace may free them.
_CONFLICTED: set[str] = set()
# Problems a sweep that worked can report (``health_problem``); a status refresh between
# sweeps recomputes them, where it leaves a sweep's own failure for the next sweep.
HEALTH_REASONS = (
    conditions.WORKERS_NOT_CONSUMING,
    conditions.POD_WATCH_FAILED,
    conditions.HELD_BY_SILENT_WORKER,
)
# While a silent worker process in a Pod holds entries (its deadline already passed), the
# loop looks at its Pod again this often rather than at once and forever.
SILENT_WORKER_RECHECK_SECONDS = 2.0


# ``planning.conflicts`` of each namespace, with the claims it was computed from. Every loop
# asks at every sweep, and sorting hundreds of policies each time was a large part of an
# idle sweep's CPU. kopf's index keeps a policy's claim object until its value changes, so
# unchanged claims are recognised by identity (the cache holds them: no id is reused).
_CONFLICTS: dict[str, tuple[list[planning.PolicyClaim], dict[str, planning.Conflict]]] = {}


def conflicts_in(
    namespace: str, claims: Iterable[planning.PolicyClaim]
) -> dict[str, planning.Conflict]:
    current = list(claims)
    known = _CONFLICTS.get(namespace)
    unchanged = (
        known is not None
        and len(known[0]) == len(current)
        and all(map(operator.is_, known[0], current))
    )
    if known is not None and unchanged:
        return known[1]
    found = planning.conflicts(current)
    _CONFLICTS[namespace] = (current, found)
    return found


def wake(policy_key: str) -> bool:
    waker = _WAKERS.get(policy_key)
    if waker is None:
        return False
    waker.set()
    return True


def wake_conflicted(namespace: str) -> None:
    """A policy of ``namespace`` changed or went away: let the loops that yield re-check."""
    for key in [key for key in _CONFLICTED if key.partition("/")[0] == namespace]:
        wake(key)


def utc_now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class Rescue:
    pod: str
    count: int
    time: str
    seconds_to_redispatch: float | None = None

    def as_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"pod": self.pod, "count": self.count, "time": self.time}
        if self.seconds_to_redispatch is not None:
            status["secondsToRedispatch"] = self.seconds_to_redispatch
        return status


@dataclasses.dataclass
class PendingRescue:
    pod: str
    ending: planning.PodEnding | None
    started: float  # time.monotonic() of the pod event
    failures: int = 0
    # Silent incarnations whose Pod, read by the operator, proved them gone.
    proven: tuple[planning.EndedIncarnation, ...] = ()

    @property
    def reason(self) -> str:
        if self.ending is not None:
            return self.ending.reason
        return "; ".join(sorted({ended.reason for ended in self.proven}))


@dataclasses.dataclass
class Connections:
    """The database and broker of one policy, switched when a Secret's value changes; both
    shared with the other policies that name the same DSN or broker URL (``pools``,
    ``publishers``). The pod-restart hook borrows from a reserve of connections of its own:
    it runs while a sweep may hold one inside a transaction, and must not queue behind
    sweeps.
    """

    dsn: str | None = None
    shared: pools.SharedDatabase | None = None
    db: reconcile.Sessions | None = None
    rescue_db: reconcile.Sessions | None = None
    broker_url: str | None = None
    transport_options: dict[str, Any] | None = None
    shared_publisher: publishers.SharedPublisher | None = None
    publisher: broker.Publisher | None = None

    def use(
        self, *, dsn: str, broker_url: str, transport_options: dict[str, Any] | None = None
    ) -> None:
        if dsn != self.dsn:
            self.close_databases()
            self.dsn = dsn
            self.shared = pools.attach(dsn)
            self.db = self.shared.sweeps
            self.rescue_db = self.shared.rescues
        if broker_url != self.broker_url or transport_options != self.transport_options:
            self.close_publisher()
            self.shared_publisher = publishers.attach(
                broker_url, transport_options=transport_options
            )
            self.publisher = self.shared_publisher
            self.broker_url = broker_url
            self.transport_options = transport_options

    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a message: the DSN, the broker URL and their passwords."""
        found: tuple[str, ...] = ()
        if self.dsn is not None:
            found += ledger.dsn_secrets(self.dsn)
        if self.broker_url is not None:
            found += broker.url_secrets(self.broker_url)
        return found

    def close_databases(self) -> None:
        if self.shared is not None:
            pools.detach(self.shared)
        self.shared = self.db = self.rescue_db = None

    def close_publisher(self) -> None:
        if self.shared_publisher is not None:
            publishers.detach(self.shared_publisher)
        self.shared_publisher = self.publisher = None
        self.broker_url = self.transport_options = None

    def close(self) -> None:
        self.close_databases()
        self.close_publisher()


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
        self.waker = asyncio.Event()
        self.connections = Connections()
        self.policy: policy_module.Policy | None = None
        self.last_status_write = 0.0
        # When the last sweep ended, written with every status write (see ``report``).
        self.last_sweep_time: str | None = None
        self.reported_facts: tuple[Any, ...] | None = None
        self.status_write_deferred = False
        self.submitted_conditions: list[dict[str, Any]] | None = None
        self.submitted_policy_status: tuple[int, list[dict[str, Any]]] | None = None
        self.last_counts: reconcile.StatusSnapshot | None = None
        self.outcomes_until: datetime.datetime | None = None
        self.dispatched_since_write = 0
        self.broker_identity: str | None = None
        self.last_problem: conditions.Problem | None = None
        self.failures_in_a_row = 0
        self.last_rescue: Rescue | None = None
        self.rescue_retry: asyncio.Future[None] | None = None
        self.rescue_lock = asyncio.Lock()  # pod events arrive concurrently; rescue in order
        # The last container statuses seen per pod uid: what the next event is judged against.
        self.containers_seen: dict[str, tuple[planning.ContainerStatus, ...]] = {}
        # The phase and running container instances last seen per pod uid: only a change in
        # them (or a pod's first event, or its end) can prove a process dead.
        self.instances_seen: dict[str, tuple[str | None, frozenset[Any]]] = {}
        # Pod events whose rescue has not succeeded yet (say, the database was down): kept
        # and retried until it does, so a rescue is never dropped.
        self.unfinished_rescues: list[PendingRescue] = []
        self.pod_watch: podwatch.Subscription | None = None
        self.index_condition: tuple[str, str, str, str] | None = None
        self.index_checked: tuple[int, float] | None = None  # (generation, time.monotonic())
        self.lease_condition: tuple[str, str, str, str] | None = None
        # The heartbeat timeout of the workers last seen running this policy's entries.
        self.workers_heartbeat_timeout_seconds: float | None = None
        self.pod_selector = ""
        self.pod_watch_failure: str | None = None  # set from the watch thread
        # Every ProcessingPolicy by namespace (a kopf index), to find the ones that overlap.
        self.peers = peers or {}
        self.workers_stuck = False
        # Why running entries wait on silent worker processes in Pods (a condition), if any.
        self.silent_held: str | None = None
        self.errors_logged: set[type[BaseException]] = set()
        self.pacing = planning.RatePacing()
        # This replica's claim to the policy when replicas share the policies (membership).
        self.fence = fence
        # Whether the policy's Lease still names a fence (holder and token): asked when the
        # ledger's owner row refuses this replica (``owner_disagreement``).
        self.lease_backs = lease_backs

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stopped: Any) -> None:
        _WAKERS[self.key] = self.waker
        logger.info("policy %s: loop started", self.key)
        try:
            while not stopped:
                delay = await self.iterate()
                await self.wait_for_next_sweep(delay, stopped)
        finally:
            await self.forget_work_if_deleted()
            _WAKERS.pop(self.key, None)
            _CONFLICTED.discard(self.key)
            wake_conflicted(self.namespace)
            self.stop_pod_watch()
            statuswriter.WRITER.forget(namespace=self.namespace, name=self.name)
            self.connections.close()
            logger.info("policy %s: loop stopped", self.key)

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
                self.problem_of(error).message,
            )

    async def wait_for_next_sweep(self, delay_seconds: float, stopped: Any) -> None:
        """Sleep until the next sweep; while work is in flight, refresh the status meanwhile.

        Between sweeps nothing is dispatched, but workers keep finishing entries: a person
        watching ``kubectl get processingstatus`` should see the counts move, not freeze for
        a whole sweep interval. Refreshing costs two index-backed counts, no sweep. What it
        reads also ends the sleep early when something fell due that the sweep could not
        foresee (``planning.sweep_early``): a body started since, whose worker went silent.
        """
        deadline = time.monotonic() + delay_seconds
        while True:
            remaining = deadline - time.monotonic()
            busy = self.last_counts is not None and self.last_counts.in_flight > 0
            chunk = min(remaining, STATUS_LIVE_REFRESH_SECONDS) if busy else remaining
            woken = await self.sleep(chunk, stopped)
            if woken or stopped or time.monotonic() >= deadline:
                return
            counts = await self.refresh_status()
            if counts is not None and planning.sweep_early(
                seconds_until_next_due=counts.seconds_until_next_due,
                suspended=self.policy is not None and self.policy.schedule.suspend,
            ):
                return  # a worker went silent, or a retry or lease fell due, since the sweep

    async def refresh_status(self) -> reconcile.StatusSnapshot | None:
        """Report fresh counts between sweeps; returns them (None when it could not)."""
        db, publisher, policy = self.connections.db, self.connections.publisher, self.policy
        if db is None or publisher is None or policy is None:
            return None
        if self.last_problem is not None and self.last_problem.reason not in HEALTH_REASONS:
            return None
        try:
            if await self.notice_broker_restart(policy, db=db, publisher=publisher):
                return None  # the loop was woken to re-dispatch; it reports after that sweep
            counts = await self.observe(policy, db=db, publisher=publisher)
        except Exception:  # the next sweep meets it too, and reports it
            return None
        generation = int(self.body.get("metadata", {}).get("generation") or 0)
        problem = self.health_problem(policy, counts)
        await self.report(policy=policy, problem=problem, generation=generation, counts=counts)
        return counts

    async def sleep(self, delay_seconds: float, stopped: Any) -> bool:
        """Sleep up to ``delay_seconds``; True when woken early by a wake-up request."""
        if self.waker.is_set():
            self.waker.clear()
            return True
        stop_waiter = asyncio.ensure_future(stopped.wait())
        wake_waiter = asyncio.ensure_future(self.waker.wait())
        try:
            await asyncio.wait(
                {stop_waiter, wake_waiter},
                timeout=max(0.0, delay_seconds),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_waiter.cancel()
            wake_waiter.cancel()
        woken = self.waker.is_set()
        self.waker.clear()
        return woken

    async def iterate(self) -> float:
        """One pass: returns how many seconds to sleep before the next one."""
        generation = int(self.body.get("metadata", {}).get("generation") or 0)
        await self.repair_diffbase()
        try:
            policy = policy_module.parse_policy(
                self.body.get("spec") or {}, namespace=self.namespace, name=self.name
            )
        except policy_module.InvalidPolicy as error:
            # An edit of the spec wakes the loop at once (handlers.wake_on_change).
            problem = conditions.Problem(conditions.INVALID_SPEC, str(error))
            metrics.SWEEP_ERRORS.labels(self.namespace, self.name, problem.reason).inc()
            await self.report(policy=None, problem=problem, generation=generation)
            return INVALID_SPEC_RECHECK_SECONDS
        self.policy = policy
        conflict = self.conflict(policy)
        if conflict is not None:
            await self.report(policy=policy, problem=conflict, generation=generation)
            return policy.schedule.sweep_interval_seconds
        try:
            dsn, broker_url = await asyncio.to_thread(self.read_secrets, policy)
            self.connections.use(
                dsn=dsn,
                broker_url=broker_url,
                transport_options=policy.task.transport_options(),
            )
            db, publisher = self.connections.db, self.connections.publisher
            assert db is not None and publisher is not None
            conflict = await self.database_conflict(policy, db=db)
            if conflict is not None:
                self.stop_pod_watch()  # its workers' rescues are the older policy's
                await self.report(policy=policy, problem=conflict, generation=generation)
                return policy.schedule.sweep_interval_seconds
            self.ensure_pod_watch(policy)
            await self.handle_retry_dead_request(policy, db=db)
            await self.clear_annotation(SWEEP_NOW_ANNOTATION)
            result: reconcile.SweepResult | None = None
            await self.notice_broker_restart(policy, db=db, publisher=publisher)
            await self.finish_rescues()
            if not policy.schedule.suspend:
                rate = policy.limits.dispatch_per_second
                held = self.pacing.holds(dispatch_per_second=rate, now=time.monotonic())
                result = await asyncio.to_thread(
                    reconcile.reconcile_once,
                    policy,
                    db=db,
                    broker=publisher,
                    hold_dispatch=held,
                    fence=self.fence,
                )
                if not held:
                    self.pacing.swept(
                        rate_allows_in_seconds=result.rate_allows_in_seconds, now=time.monotonic()
                    )
                metrics.SWEEP_SECONDS.labels(self.namespace, self.name).observe(
                    result.duration_seconds
                )
            await self.judge_silent_workers(policy, db=db)
            counts = await self.observe(policy, db=db, publisher=publisher)
            await self.check_index(policy, db=db, generation=generation)
        except ledger.FencedOut as error:
            disagreement = await self.owner_disagreement(error)
            if disagreement is None:
                raise  # another replica sweeps the policy now: this loop ends (membership.serve)
            if error.current is not None and error.current.token < sharding.MAX_LEASE_TOKEN:
                # membership.serve takes the Lease over above the row's token: said once.
                await self.event("Warning", disagreement.reason, disagreement.message)
                raise
            # No Lease can carry that token: this replica keeps the Lease and the policy
            # shows why it is not swept, until someone removes the row.
            return await self.failed(policy, disagreement, generation=generation)
        except Exception as error:  # every failure is a condition, never a dead loop
            return await self.failed(policy, self.problem_of(error), generation=generation)
        self.failures_in_a_row = 0
        await self.report(
            policy=policy,
            problem=self.health_problem(policy, counts),
            generation=generation,
            result=result,
            counts=counts,
        )
        delay = policy.schedule.sweep_interval_seconds
        if not policy.schedule.suspend:
            delay = planning.next_wakeup_seconds(
                sweep_interval_seconds=delay,
                earliest_retry_in_seconds=counts.seconds_until_next_due,
                rate_allows_in_seconds=self.pacing.allows_in_seconds(now=time.monotonic()),
            )
        if self.silent_held is not None:
            delay = max(delay, SILENT_WORKER_RECHECK_SECONDS)
        if self.status_write_deferred:
            delay = min(delay, STATUS_MIN_INTERVAL_SECONDS)
        return delay

    async def failed(
        self, policy: policy_module.Policy, problem: conditions.Problem, *, generation: int
    ) -> float:
        """Report a sweep that failed; how long to back off before the next one."""
        metrics.SWEEP_ERRORS.labels(self.namespace, self.name, problem.reason).inc()
        await self.report(policy=policy, problem=problem, generation=generation)
        self.failures_in_a_row += 1
        return ERROR_BACKOFF_SECONDS[min(self.failures_in_a_row, len(ERROR_BACKOFF_SECONDS)) - 1]

    async def owner_disagreement(self, refused: ledger.FencedOut) -> conditions.Problem | None:
        """The ledger refused this replica's fence while the policy's Lease still names it:
        the owner row was written by no replica under this Lease (forged, or left by an
        earlier Lease of the policy, deleted since). A real takeover writes the Lease first,
        so it never looks like this. When a Lease can carry a token above the row's,
        ``membership.serve`` takes the Lease over above it (and an Event says so);
        otherwise sweeping stops — the row is the fence — with a condition that says what
        disagrees, never silently. None when the Lease does not back this replica (or
        cannot be read): a takeover."""
        if self.fence is None or self.lease_backs is None or refused.current is None:
            return None
        if not await self.lease_backs(self.fence):
            return None
        row = refused.current
        return conditions.Problem(
            conditions.OWNER_ROW_DISAGREES,
            f"the ledger's owner row of this policy names {policy_annotations.shown(row.holder)}"
            f" (token {row.token}), but the policy's Lease is held by this replica, "
            f"{self.fence.holder} (token {self.fence.token}): no replica wrote that row under "
            f"this Lease. This replica takes its Lease over above that token if a Lease can "
            f"carry it (at most {sharding.MAX_LEASE_TOKEN}); otherwise nothing is dispatched "
            f"until the policy's row of {ledger.SCHEMA}.policy_owners (policy_key "
            f"{self.key!r}) is removed. Check who may write that table: only the operator's "
            "role may (celery-reconciler grants)",
        )

    def conflict(self, policy: policy_module.Policy) -> conditions.Problem | None:
        """Conflict when an older policy already processes the same rows (see
        ``planning.conflicts``): this one then dispatches nothing, so no entry runs twice."""
        found = conflicts_in(self.namespace, self.peers.get(self.namespace, ())).get(policy.key)
        if found is None:
            _CONFLICTED.discard(self.key)
            return None
        _CONFLICTED.add(self.key)
        winner = found.winner.partition("/")[2]
        return conditions.Problem(
            conditions.CONFLICT,
            f"overlaps the older ProcessingPolicy {winner} ({found.what}, same "
            f"spec.source.databaseSecretRef): this policy dispatches nothing while {winner} "
            "processes these rows; delete one of them or change its table, pending predicate "
            "or task",
        )

    async def database_conflict(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions
    ) -> conditions.Problem | None:
        """Conflict when the database records an older policy, of any namespace, Secret or
        DSN spelling, that processes the same rows (``overlaps``). A record whose policy is
        gone (its finalizer removed by hand) is removed, and this policy runs."""
        created = str(self.body.get("metadata", {}).get("creationTimestamp") or "")
        mine = overlaps.held_by(policy, uid=self.uid, created=created)
        for _ in range(2):
            found = await asyncio.to_thread(reconcile.arbitrate, policy, db=db, mine=mine)
            if found is None:
                return None
            conflict, winner = found
            namespace, _, name = winner.policy_key.partition("/")
            try:
                existing = await asyncio.to_thread(kube.get_policy, namespace=namespace, name=name)
            except kube.KubernetesUnavailable:
                break  # cannot tell (say, no right to read that namespace): yield, to be safe
            if (existing or {}).get("metadata", {}).get("uid") == winner.policy_uid:
                break
            logger.info(
                "policy %s: the ledger recorded %s (uid %s), which no longer exists; removed it",
                self.key,
                winner.policy_key,
                winner.policy_uid,
            )
            await asyncio.to_thread(
                reconcile.forget_work,
                db,
                policy_key=winner.policy_key,
                policy_uid=winner.policy_uid,
            )
        return conditions.Problem(
            conditions.CONFLICT,
            f"overlaps the older ProcessingPolicy {conflict.winner} ({conflict.what}, in the "
            "same database): this policy dispatches nothing while it processes these rows; "
            "delete one of them or change its table, pending predicate or task",
        )

    def health_problem(
        self, policy: policy_module.Policy, counts: reconcile.StatusSnapshot
    ) -> conditions.Problem | None:
        """What a sweep that worked can still be wrong about: a pod watch the API refuses,
        or work that waits for workers that never take it."""
        if self.pod_watch_failure is not None:
            return conditions.Problem(conditions.POD_WATCH_FAILED, self.pod_watch_failure)
        if self.silent_held is not None:
            return conditions.Problem(conditions.HELD_BY_SILENT_WORKER, self.silent_held)
        consumption = counts.consumption
        self.workers_stuck = planning.workers_not_consuming(
            oldest_queued_seconds=consumption.oldest_queued_seconds,
            running=counts.running,
            last_finished_seconds_ago=consumption.last_finished_seconds_ago,
            start_timeout_seconds=policy.workers.start_timeout_seconds,
            was_stuck=self.workers_stuck,
        )
        if not self.workers_stuck:
            return None
        queue, task = policy.task.queue, policy.task.name
        waited = int(consumption.oldest_queued_seconds or 0)
        on_broker = broker.describe_broker_url(self.connections.broker_url or "")
        return conditions.Problem(
            conditions.WORKERS_NOT_CONSUMING,
            f"{counts.in_flight - counts.running} entries dispatched to queue {queue!r} on "
            f"{on_broker} wait for a worker (the oldest for {waited}s, "
            f"spec.workers.startTimeout is {policy.workers.start_timeout_seconds:g}s) and no "
            f"worker started any: check that a worker consumes queue {queue!r} on that same "
            f"broker (celery worker -Q {queue}; the celery command takes BROKER_URL from its "
            f"environment as --broker), has task {task!r} registered, and has "
            "CELERY_RECONCILER_DSN set",
        )

    def problem_of(self, error: Exception) -> conditions.Problem:
        """``problem_of``, and the traceback of an unexpected error in the log — once per
        kind of error, without secrets — since that one is a bug to report."""
        problem = problem_of(error, secrets=self.connections.secrets())
        if problem.reason == conditions.INTERNAL_ERROR and type(error) not in self.errors_logged:
            self.errors_logged.add(type(error))
            trace = "".join(traceback.format_exception(error))
            logger.error(
                "policy %s: unexpected error, reported as %s (logged once):\n%s",
                self.key,
                conditions.INTERNAL_ERROR,
                ledger.sanitize_error(trace, secrets=self.connections.secrets(), limit=20_000),
            )
        return problem

    async def observe(
        self,
        policy: policy_module.Policy,
        *,
        db: reconcile.Sessions,
        publisher: broker.Publisher,
    ) -> reconcile.StatusSnapshot:
        """Read what the status and the metrics show: counts, finished attempts, queue depth."""
        counts = await asyncio.to_thread(
            reconcile.collect_status, policy, db=db, outcomes_since=self.outcomes_until
        )
        self.count_outcomes(counts.outcomes)
        await self.check_lease(policy, counts)
        depth = await asyncio.to_thread(publisher.queue_depth, policy.task.queue)
        metrics.QUEUE_DEPTH.labels(self.namespace, self.name).set(depth)
        return counts

    async def check_lease(
        self, policy: policy_module.Policy, counts: reconcile.StatusSnapshot
    ) -> None:
        """Tell the user, on the policy, when its lease is shorter than the heartbeat timeout
        of the workers running its entries — which only the ledger knows (each worker sets
        its own), so nothing at apply time can refuse it."""
        seen = counts.consumption.workers_heartbeat_timeout_seconds
        if seen is not None:
            self.workers_heartbeat_timeout_seconds = seen
        if self.workers_heartbeat_timeout_seconds is None:
            return
        condition = conditions.lease_fits_workers(
            lease_seconds=policy.lease.timeout_seconds,
            heartbeat_timeout_seconds=self.workers_heartbeat_timeout_seconds,
        )
        if condition[1] == "False" and condition != self.lease_condition:
            logger.warning("policy %s: %s", self.key, condition[3])
            await self.event("Warning", conditions.LEASE_BELOW_HEARTBEAT_TIMEOUT, condition[3])
        self.lease_condition = condition

    async def check_index(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions, generation: int
    ) -> None:
        """Tell the user, on the policy, when the pending query has no index to use."""
        checked = self.index_checked
        if (
            checked is not None
            and checked[0] == generation
            and time.monotonic() - checked[1] < INDEX_ADVICE_RECHECK_SECONDS
        ):
            return
        self.index_checked = (generation, time.monotonic())
        advice = await asyncio.to_thread(reconcile.advise_index, policy, db=db)
        condition = conditions.indexed(
            create_index=None if advice is None else advice.create_index,
            table=str(policy.source.table),
            table_rows=0 if advice is None else advice.table_rows,
        )
        if advice is not None and condition != self.index_condition:
            logger.warning("policy %s: %s", self.key, condition[3])
            await self.event("Warning", conditions.MISSING_INDEX, condition[3])
        self.index_condition = condition

    async def notice_broker_restart(
        self,
        policy: policy_module.Policy,
        *,
        db: reconcile.Sessions,
        publisher: broker.Publisher,
    ) -> bool:
        """A broker that restarted without persistence forgot every queued message; its
        entries would wait for their leases. Spot the restart (a new server identity) and
        make them eligible at once. True when entries were released and the loop woken."""
        identity = await asyncio.to_thread(publisher.instance_id)
        previous, self.broker_identity = self.broker_identity, identity
        if previous is None or identity is None or identity == previous:
            return False
        released = await asyncio.to_thread(reconcile.release_queued, policy, db=db)
        logger.warning(
            "policy %s: the broker restarted; re-dispatching %d queued entries", self.key, released
        )
        await self.event(
            "Warning",
            "BrokerRestarted",
            f"the broker restarted (new server identity): re-dispatching {released} queued "
            "entries whose messages it may have lost",
        )
        self.waker.set()
        return True

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

    # -- inputs -------------------------------------------------------------------------

    def read_secrets(self, policy: policy_module.Policy) -> tuple[str, str]:
        database, broker_ref = policy.source.database_secret, policy.task.broker_secret
        assert database is not None and broker_ref is not None  # parse_policy requires them
        database_at = {
            "namespace": self.namespace,
            "name": database.name,
            "key": database.key,
            "field": "spec.source.databaseSecretRef",
        }
        broker_at = {
            "namespace": self.namespace,
            "name": broker_ref.name,
            "key": broker_ref.key,
            "field": "spec.task.brokerSecretRef",
        }
        # A failing policy reads its Secrets afresh: its attempts are already spaced by the
        # error backoff, and a Secret just fixed must count at the next one, not 10 s later
        # (by then the backoff may have grown to a minute).
        fresh = 0.0 if self.failures_in_a_row else kube.SECRET_MAX_AGE_SECONDS
        dsn = kube.read_secret_value(**database_at, max_age_seconds=fresh)
        url = kube.read_secret_value(**broker_at, max_age_seconds=fresh)
        # Checked here, where the Secret's name is known, so the error can name it; a value
        # in use passed already (parsing a DSN at every sweep showed in an idle one's CPU).
        if dsn != self.connections.dsn:
            ledger.check_dsn(dsn, where=kube.secret_value_description(**database_at))
        if url != self.connections.broker_url:
            broker.check_broker_url(url, where=kube.secret_value_description(**broker_at))
        return dsn, url

    def annotation(self, name: str) -> str | None:
        annotations = self.body.get("metadata", {}).get("annotations") or {}
        value = annotations.get(name)
        return None if value is None else str(value)

    async def clear_annotation(self, name: str) -> None:
        if self.annotation(name) is not None:
            await asyncio.to_thread(
                kube.annotate_policy,
                namespace=self.namespace,
                name=self.name,
                annotations={name: None},
            )

    async def repair_diffbase(self) -> None:
        """kopf's record of the last spec it handled is an annotation that ``edit`` can
        overwrite; kopf reads a corrupt one as absent (``handlers.TolerantDiffBaseStorage``),
        and this removes it, saying so, so that kopf writes a good one again."""
        problem = policy_annotations.diffbase_problem(self.annotation(policy_annotations.DIFFBASE))
        if problem is not None:
            await self.event("Warning", "InvalidRequest", f"{problem}; removed it")
            await self.clear_annotation(policy_annotations.DIFFBASE)

    async def handle_retry_dead_request(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions
    ) -> None:
        value = self.annotation(RETRY_DEAD_ANNOTATION)
        if value is None:
            return
        try:
            request = policy_annotations.parse_retry_dead(value)
        except policy_annotations.InvalidAnnotation as error:
            await self.event("Warning", "InvalidRequest", f"{error}; removed it")
            await self.clear_annotation(RETRY_DEAD_ANNOTATION)
            return
        revived = await asyncio.to_thread(
            reconcile.retry_dead, policy, db=db, entry_ids=request.entry_ids
        )
        await self.event("Normal", "RetryDead", f"{revived} dead entries scheduled to run again")
        await self.clear_annotation(RETRY_DEAD_ANNOTATION)

    # -- pod-restart hook ---------------------------------------------------------------

    def ensure_pod_watch(self, policy: policy_module.Policy) -> None:
        selector = kube.label_selector(policy.workers)
        if selector == self.pod_selector:
            return
        self.stop_pod_watch()
        self.pod_selector = selector
        self.pod_watch_failure = None
        self.containers_seen.clear()
        self.instances_seen.clear()
        if not selector:
            return
        loop = asyncio.get_running_loop()

        def on_event(event_type: str, pod: kube.WorkerPod) -> None:
            loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self.on_pod_event(event_type, pod))
            )

        def on_health(failure: str | None) -> None:
            loop.call_soon_threadsafe(self.note_pod_watch_health, selector, failure)

        # Shared with every policy of this namespace that selects the same pods.
        self.pod_watch = podwatch.subscribe(
            namespace=self.namespace,
            label_selector=selector,
            on_event=on_event,
            on_health=on_health,
        )

    def note_pod_watch_health(self, selector: str, failure: str | None) -> None:
        """What the pod watch says about itself; a watch of a replaced selector has no say."""
        if selector == self.pod_selector and failure != self.pod_watch_failure:
            self.pod_watch_failure = failure
            self.waker.set()  # report it now, not at the next sweep

    def stop_pod_watch(self) -> None:
        if self.pod_watch is not None:
            podwatch.unsubscribe(self.pod_watch)
            self.pod_watch = None
        self.pod_selector = ""

    async def on_pod_event(self, event_type: str, pod: kube.WorkerPod) -> None:
        """Judge the pod's incarnations by this event whenever it can prove a death: the
        pod's first event here (``ADDED``: at start, after a watch gap, a new pod), a change
        in the container instances it runs, its end. Steady events cost nothing."""
        deleted = event_type == "DELETED"
        previous = self.containers_seen.get(pod.uid)
        running = (pod.phase, planning.running_instances(pod.containers))
        changed = self.instances_seen.get(pod.uid) != running
        if deleted:
            self.containers_seen.pop(pod.uid, None)
            self.instances_seen.pop(pod.uid, None)
        else:
            self.containers_seen[pod.uid] = pod.containers
            self.instances_seen[pod.uid] = running
        if not (deleted or changed or event_type == "ADDED"):
            return
        ending = planning.pod_ending(
            pod_uid=pod.uid,
            old=previous,
            new=pod.containers,
            deleted=deleted,
            phase=pod.phase,
        )
        if ending is not None:
            self.unfinished_rescues.append(
                PendingRescue(pod=pod.name, ending=ending, started=time.monotonic())
            )
            await self.finish_rescues()

    async def judge_silent_workers(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions
    ) -> None:
        """Silence never moves the work of a process in a Pod: read its Pod, and end it only
        on proof (``planning.judge_silent``); what is held shows as a condition."""
        silent = await asyncio.to_thread(reconcile.silent_pod_workers, policy, db=db)
        lookups: dict[tuple[str, str], planning.PodLookup] = {}
        proven: dict[str, list[planning.EndedIncarnation]] = {}
        held: list[planning.HeldIncarnation] = []
        for found in silent:
            lookup = None
            if found.pod_namespace and found.pod_name:
                where = (found.pod_namespace, found.pod_name)
                if where not in lookups:
                    lookups[where] = await asyncio.to_thread(
                        kube.look_up_worker_pod, namespace=where[0], name=where[1]
                    )
                lookup = lookups[where]
            verdict = planning.judge_silent(silent=found, lookup=lookup)
            if isinstance(verdict, planning.EndedIncarnation):
                proven.setdefault(found.pod_name or found.pod_uid, []).append(verdict)
            else:
                held.append(verdict)
        self.silent_held = planning.held_summary(held)
        for pod, ended in proven.items():
            self.unfinished_rescues.append(
                PendingRescue(pod=pod, ending=None, started=time.monotonic(), proven=tuple(ended))
            )
        if proven:
            await self.finish_rescues()

    async def finish_rescues(self) -> None:
        """Run every rescue not yet done; one that fails stays queued and is retried with
        backoff (and by every sweep) until it succeeds."""
        db, publisher, policy = self.connections.rescue_db, self.connections.publisher, self.policy
        if db is None or publisher is None or policy is None:
            return  # no sweep has resolved the Secrets yet: the first sweep runs them
        async with self.rescue_lock:
            await self.run_unfinished_rescues(policy, db=db, publisher=publisher)

    async def run_unfinished_rescues(
        self,
        policy: policy_module.Policy,
        *,
        db: reconcile.Sessions,
        publisher: broker.Publisher,
    ) -> None:
        while self.unfinished_rescues:
            pending = self.unfinished_rescues[0]
            try:
                result = await asyncio.wrap_future(
                    pools.run_rescue(
                        functools.partial(
                            reconcile.rescue,
                            policy,
                            db=db,
                            broker=publisher,
                            ending=pending.ending,
                            fence=self.fence,
                            proven=pending.proven,
                        )
                    )
                )
            except ledger.FencedOut:
                # Another replica owns the policy now; its sweeps expire what this rescue
                # would have re-dispatched (heartbeats, leases), and this loop is ending.
                self.unfinished_rescues.clear()
                return
            except Exception as error:  # kept and retried, whatever the failure
                pending.failures += 1
                logger.warning(
                    "policy %s: rescue after pod %s (%s) failed: %s; retrying",
                    self.key,
                    pending.pod,
                    pending.reason,
                    self.problem_of(error).message,
                )
                self.schedule_rescue_retry(pending.failures)
                return
            self.unfinished_rescues.pop(0)
            await self.note_rescue(pending, result)

    def schedule_rescue_retry(self, failures: int) -> None:
        if self.rescue_retry is not None and not self.rescue_retry.done():
            return
        delay = ERROR_BACKOFF_SECONDS[min(failures, len(ERROR_BACKOFF_SECONDS)) - 1]

        async def retry_later() -> None:
            await asyncio.sleep(delay)
            await self.finish_rescues()

        self.rescue_retry = asyncio.ensure_future(retry_later())

    async def note_rescue(self, pending: PendingRescue, result: reconcile.RescueResult) -> None:
        metrics.DISPATCHED.labels(self.namespace, self.name).inc(result.redispatched)
        count = result.expired.retry_now + result.expired.dead
        if count == 0:
            return
        self.last_rescue = Rescue(
            pod=pending.pod,
            count=count,
            time=utc_now_text(),
            seconds_to_redispatch=round(time.monotonic() - pending.started, 3),
        )
        metrics.RESCUED.labels(self.namespace, self.name).inc(count)
        message = (
            f"worker pod {pending.pod}: {pending.reason}; {result.ended} worker "
            f"processes ended, {result.redispatched} entries re-dispatched ahead of the queue, "
            f"{result.settled} found already processed, {result.expired.dead} dead-lettered"
        )
        logger.info("policy %s: %s", self.key, message)
        await self.event("Normal", "Rescued", message)
        self.waker.set()  # report the rescue in the status now
        # A message the dead worker took just before it died is not "stranded" yet; the
        # sweep that follows this long after finds it (reconcile._redispatch_stranded).
        asyncio.get_running_loop().call_later(
            reconcile.STRANDED_DELIVERY_SECONDS + 0.5, self.waker.set
        )

    # -- outputs ------------------------------------------------------------------------

    async def event(self, event_type: str, reason: str, message: str) -> None:
        await asyncio.to_thread(
            kube.post_event,
            namespace=self.namespace,
            policy_name=self.name,
            policy_uid=self.uid,
            event_type=event_type,
            reason=reason,
            message=message,
        )

    async def report(
        self,
        *,
        policy: policy_module.Policy | None,
        problem: conditions.Problem | None,
        generation: int,
        result: reconcile.SweepResult | None = None,
        counts: reconcile.StatusSnapshot | None = None,
    ) -> None:
        changed = problem != self.last_problem
        if changed and problem is not None:
            logger.warning("policy %s: %s: %s", self.key, problem.reason, problem.message)
            await self.event("Warning", problem.reason, problem.message)
        elif changed and self.last_problem is not None:
            await self.event("Normal", "Recovered", f"{self.last_problem.reason} resolved")
        self.last_problem = problem
        if result is not None:
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
        if counts is not None:
            self.last_counts = counts
            record_count_metrics(self.namespace, self.name, counts)
        facts = (
            generation,
            problem,
            None if counts is None else status_counts(counts),
            self.dispatched_since_write,
            None if self.last_rescue is None else dataclasses.astuple(self.last_rescue),
            self.index_condition,
            self.lease_condition,
        )
        since_write = time.monotonic() - self.last_status_write
        if not changed and facts == self.reported_facts and since_write < STATUS_REFRESH_SECONDS:
            return
        if not changed and since_write < STATUS_MIN_INTERVAL_SECONDS:
            self.status_write_deferred = True
            return
        self.status_write_deferred = False
        self.last_status_write = time.monotonic()
        self.reported_facts = facts
        suspended = policy is not None and policy.schedule.suspend
        # The same words after every sweep: a message that quoted the sweep's count would
        # make every busy policy's conditions, and so its status, change on every sweep.
        # ProcessingStatus carries the counts (lastDispatched).
        summary = "sweeps reach the database and the broker"
        now = utc_now_text()
        # Merged with what this loop last submitted: the live body lags while the status
        # writer holds the patch, and a transition time must not move twice.
        previous = self.submitted_conditions
        if previous is None:
            previous = (self.body.get("status") or {}).get("conditions")
        updates = list(conditions.health(problem=problem, suspended=suspended, summary=summary))
        updates.extend(
            condition
            for condition in (self.index_condition, self.lease_condition)
            if condition is not None
        )
        merged = conditions.merge(previous, updates, now=now, generation=generation)
        self.submitted_conditions = merged
        policy_status: dict[str, Any] | None = None
        # The policy's own status changes when its conditions or generation do; a sweep that
        # changed nothing else is told by ProcessingStatus alone, one write instead of two.
        if (generation, merged) != self.submitted_policy_status:
            self.submitted_policy_status = (generation, merged)
            policy_status = {"observedGeneration": generation, "conditions": merged}
            if self.last_sweep_time is not None:
                policy_status["lastSweepTime"] = self.last_sweep_time
        processing: dict[str, Any] = {"policyGeneration": generation, "conditions": merged}
        if self.last_sweep_time is not None:
            processing["lastSweepTime"] = self.last_sweep_time
        if counts is not None:
            processing.update(status_counts(counts))
        if result is not None:
            # A deferred write must not lose what the sweeps before it dispatched.
            processing["lastDispatched"] = self.dispatched_since_write
            self.dispatched_since_write = 0
        if self.last_rescue is not None:
            processing["lastRescue"] = self.last_rescue.as_status()
        statuswriter.WRITER.submit(
            namespace=self.namespace,
            name=self.name,
            owner_uid=self.uid,
            policy_status=policy_status,
            processing=processing,
        )


# The failures a sweep can meet, each with its condition reason; the first match wins, so
# a subclass comes before its base (``DsnInvalid`` is a ``DatabaseUnavailable``). Every
# message here was written for the user: it names the field to fix and holds no secret.
SWEEP_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (kube.SecretNotFound, conditions.SECRET_NOT_FOUND),
    (kube.SecretInvalid, conditions.SECRET_INVALID),
    (reconcile.DsnInvalid, conditions.SECRET_INVALID),
    (broker.BrokerUrlInvalid, conditions.SECRET_INVALID),
    (kube.KubernetesUnavailable, conditions.KUBERNETES_UNAVAILABLE),
    (pools.PoolExhausted, conditions.CONNECTION_POOL_EXHAUSTED),
    (ledger.TooManyConnections, conditions.TOO_MANY_CONNECTIONS),
    (reconcile.DatabaseUnavailable, conditions.DATABASE_UNAVAILABLE),
    (reconcile.LedgerPermissionDenied, conditions.LEDGER_PERMISSION_DENIED),
    (reconcile.BrokerUnavailable, conditions.BROKER_UNAVAILABLE),
    (reconcile.SourceInvalid, conditions.SOURCE_INVALID),
)


def problem_of(error: BaseException, *, secrets: tuple[str, ...] = ()) -> conditions.Problem:
    """The condition for a failed sweep. Anything not in ``SWEEP_ERRORS`` is a bug of ours,
    ``InternalError``, whose message is sanitized of ``secrets`` since nobody wrote it for
    the user."""
    for kind, reason in SWEEP_ERRORS:
        if isinstance(error, kind):
            return conditions.Problem(reason, str(error))
    detail = ledger.sanitize_error(
        str(error).strip() or "no message", secrets=secrets, limit=ERROR_MESSAGE_LIMIT
    )
    return conditions.Problem(
        conditions.INTERNAL_ERROR,
        f"unexpected {type(error).__name__}: {detail} — a bug of celery-reconciler: please "
        "report it with the operator's log (it has the traceback); the loop retries with backoff",
    )


ERROR_MESSAGE_LIMIT = 500


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
