"""Bringing lost work back at once: the rescue queue, and the broker that forgot its queue.

A rescue moves the entries of worker processes proven dead (``pod_proofs``: a pod event,
or a silent worker's Pod read) back to dispatch, ahead of the backlog (``reconcile.rescue``).
Rescues run in order, on connections and threads of their own (``pools``), so they never
queue behind sweeps; one that fails (the database is away) stays queued and is retried
with backoff, and by every sweep, until it succeeds — a rescue is never dropped. The last
rescue shows in the status (``lastRescue``) and each one in an Event.

A broker that restarted without persistence forgot every queued message, and the entries
would wait for their leases: ``BrokerRestarts`` spots the restart (a new server identity)
and makes them eligible at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from celery_reconciler import broker, ledger, metrics, planning, pools, reconcile, sharding
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import connections as connections_module
from celery_reconciler.loop import events as events_module
from celery_reconciler.loop import problems, schedule, status_report

# Every per-policy line of the operator's log names the loop as its source (see problems).
logger = logging.getLogger("celery_reconciler.loop")


@dataclasses.dataclass
class Rescue:
    """The last rescue, as ``lastRescue`` of the ProcessingStatus shows it."""

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


class RescueQueue:
    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        fence: sharding.Fence | None,
        connections: connections_module.Connections,
        current_policy: Callable[[], policy_module.Policy | None],
        events: events_module.PolicyEvents,
        errors: problems.ErrorTranslator,
        wake_loop: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.key = f"{namespace}/{name}"
        self.fence = fence
        self.connections = connections
        self.current_policy = current_policy
        self.events = events
        self.errors = errors
        self.wake_loop = wake_loop
        self.last_rescue: Rescue | None = None
        self.retry: asyncio.Future[None] | None = None
        self.lock = asyncio.Lock()  # pod events arrive concurrently; rescue in order
        # Pod events whose rescue has not succeeded yet (say, the database was down): kept
        # and retried until it does, so a rescue is never dropped.
        self.unfinished: list[PendingRescue] = []

    def add(self, pending: PendingRescue) -> None:
        self.unfinished.append(pending)

    async def finish(self) -> None:
        """Run every rescue not yet done; one that fails stays queued and is retried with
        backoff (and by every sweep) until it succeeds."""
        db, publisher = self.connections.rescue_db, self.connections.publisher
        policy = self.current_policy()
        if db is None or publisher is None or policy is None:
            return  # no sweep has resolved the Secrets yet: the first sweep runs them
        async with self.lock:
            await self.run_unfinished(policy, db=db, publisher=publisher)

    async def run_unfinished(
        self,
        policy: policy_module.Policy,
        *,
        db: reconcile.Sessions,
        publisher: broker.Publisher,
    ) -> None:
        while self.unfinished:
            pending = self.unfinished[0]
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
                self.unfinished.clear()
                return
            except Exception as error:  # kept and retried, whatever the failure
                pending.failures += 1
                logger.warning(
                    "policy %s: rescue after pod %s (%s) failed: %s; retrying",
                    self.key,
                    pending.pod,
                    pending.reason,
                    self.errors.problem_of(error).message,
                )
                self.schedule_retry(pending.failures)
                return
            self.unfinished.pop(0)
            await self.note(pending, result)

    def schedule_retry(self, failures: int) -> None:
        if self.retry is not None and not self.retry.done():
            return
        delay = schedule.backoff_seconds(failures)

        async def retry_later() -> None:
            await asyncio.sleep(delay)
            await self.finish()

        self.retry = asyncio.ensure_future(retry_later())

    async def note(self, pending: PendingRescue, result: reconcile.RescueResult) -> None:
        """Count, tell and show a rescue that succeeded."""
        metrics.DISPATCHED.labels(self.namespace, self.name).inc(result.redispatched)
        count = result.expired.retry_now + result.expired.dead
        if count == 0:
            return
        self.last_rescue = Rescue(
            pod=pending.pod,
            count=count,
            time=status_report.utc_now_text(),
            seconds_to_redispatch=round(time.monotonic() - pending.started, 3),
        )
        metrics.RESCUED.labels(self.namespace, self.name).inc(count)
        message = (
            f"worker pod {pending.pod}: {pending.reason}; {result.ended} worker "
            f"processes ended, {result.redispatched} entries re-dispatched ahead of the queue, "
            f"{result.settled} found already processed, {result.expired.dead} dead-lettered"
        )
        logger.info("policy %s: %s", self.key, message)
        await self.events.post("Normal", "Rescued", message)
        self.wake_loop()  # report the rescue in the status now
        # A message the dead worker took just before it died is not "stranded" yet; the
        # sweep that follows this long after finds it (reconcile._redispatch_stranded).
        asyncio.get_running_loop().call_later(
            reconcile.STRANDED_DELIVERY_SECONDS + 0.5, self.wake_loop
        )


class BrokerRestarts:
    def __init__(
        self,
        *,
        policy_key: str,
        events: events_module.PolicyEvents,
        wake_loop: Callable[[], None],
    ) -> None:
        self.policy_key = policy_key
        self.events = events
        self.wake_loop = wake_loop
        self.broker_identity: str | None = None

    async def notice(
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
            "policy %s: the broker restarted; re-dispatching %d queued entries",
            self.policy_key,
            released,
        )
        await self.events.post(
            "Warning",
            "BrokerRestarted",
            f"the broker restarted (new server identity): re-dispatching {released} queued "
            "entries whose messages it may have lost",
        )
        self.wake_loop()
        return True
