"""One writer for every policy's status objects: coalesced, and bounded in writes per second.

Each policy's loop decides *what* its ProcessingPolicy status and ProcessingStatus should
say; this module decides *when* the API server hears it. With hundreds of policies, writing
from each loop as it finishes means bursts of hundreds of requests (every loop sweeps at
start-up, and a database that comes back makes every policy change its conditions at once),
each competing with kopf's own watches and with the pod watches that rescues depend on.

So a loop ``submit``s its latest patches and returns at once. Patches of one policy that
wait are merged (they are JSON merge patches of ``status``: the newer value of a field wins,
and ``lastDispatched`` adds up, since each counts what its own sweeps dispatched). A few
writer tasks send them in the order the policies first asked, at most ``writes_per_second``
requests per operator with a small burst, never two requests for one policy at once (so
the API server never sees its statuses out of order); a policy that keeps changing cannot
starve the others. A policy whose conditions changed (it became Ready, or Degraded) goes
before those whose counts merely moved: 500 policies starting together show Ready before
the first round of count refreshes is through. A write that fails (the API server is away)
is put back behind the others and retried; a policy that is deleted is ``forget``-ten, so
nothing is written for it after its loop ends, and a write that finds the policy gone (HTTP
404: deleted while its status waited) is dropped, never retried.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from celery_reconciler import kube

DEFAULT_WRITES_PER_SECOND = 20.0
BURST_WRITES = 20
RETRY_SECONDS = 2.0
# Requests in flight at once (for different policies): the rate, not one request's round
# trip, should bound how fast statuses go out.
CONCURRENT_WRITES = 4
# How long the operator's exit waits for statuses still to be written.
CLOSE_FLUSH_SECONDS = 2.0

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PendingStatus:
    namespace: str
    name: str
    owner_uid: str
    policy_status: dict[str, Any] | None
    processing: dict[str, Any] | None

    def absorb(self, newer: PendingStatus) -> None:
        """Fold a newer submission in: what it says wins, what it leaves out stays."""
        self.owner_uid = newer.owner_uid
        self.policy_status = _merged(self.policy_status, newer.policy_status)
        dispatched = _dispatched(self.processing) + _dispatched(newer.processing)
        self.processing = _merged(self.processing, newer.processing)
        if self.processing is not None and "lastDispatched" in self.processing:
            self.processing["lastDispatched"] = dispatched


def _merged(older: dict[str, Any] | None, newer: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if newer is None:
        return older
    return {**(older or {}), **newer}


def _dispatched(processing: Mapping[str, Any] | None) -> int:
    return int((processing or {}).get("lastDispatched") or 0)


class StatusWriter:
    def __init__(self, *, writes_per_second: float = DEFAULT_WRITES_PER_SECOND) -> None:
        self.writes_per_second = writes_per_second
        # Policies whose conditions changed, then those whose counts did; each in the order
        # they first asked.
        self._urgent: collections.OrderedDict[str, PendingStatus] = collections.OrderedDict()
        self._routine: collections.OrderedDict[str, PendingStatus] = collections.OrderedDict()
        self._writing: set[str] = set()
        self._ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._tokens = float(BURST_WRITES)
        self._refilled = time.monotonic()
        self.writes = 0  # requests sent, for the benchmark and the tests

    def submit(
        self,
        *,
        namespace: str,
        name: str,
        owner_uid: str,
        policy_status: dict[str, Any] | None,
        processing: dict[str, Any] | None,
    ) -> None:
        if policy_status is None and processing is None:
            return
        self._start()
        key = f"{namespace}/{name}"
        item = PendingStatus(namespace, name, owner_uid, policy_status, processing)
        waiting = self._urgent.get(key) or self._routine.get(key)
        if waiting is not None:
            waiting.absorb(item)
            item = waiting
        if item.policy_status is not None and key not in self._urgent:
            # A change of conditions (Ready, Degraded and why) jumps the counts' refreshes.
            self._routine.pop(key, None)
            self._urgent[key] = item
        elif waiting is None:
            self._routine[key] = item
        assert self._ready is not None
        self._ready.set()

    def idle(self) -> bool:
        """Nothing waits to be written and nothing is being written."""
        return not (self._urgent or self._routine or self._writing)

    def forget(self, *, namespace: str, name: str) -> None:
        self._urgent.pop(f"{namespace}/{name}", None)
        self._routine.pop(f"{namespace}/{name}", None)

    async def close(self, *, flush_seconds: float = CLOSE_FLUSH_SECONDS) -> None:
        """Writes what waits, for up to ``flush_seconds``, then stops the writers. At the
        operator's exit: the last statuses of the stopped loops go out, and kopf need not
        wait out its 5 s for tasks left running — it did at every stop of the operator."""
        deadline = time.monotonic() + flush_seconds
        while self._tasks and not self.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self) -> None:
        running = asyncio.get_running_loop()
        alive = [task for task in self._tasks if not task.done() and task.get_loop() is running]
        if alive:
            return
        self._ready = asyncio.Event()
        self._tasks = [
            running.create_task(self._run(), name=f"status-writer-{number}")
            for number in range(CONCURRENT_WRITES)
        ]

    def _next(self) -> tuple[str, PendingStatus] | None:
        """The first policy waiting that no other writer is writing right now: one policy's
        requests go out one at a time, so the API server never sees them out of order."""
        for queue in (self._urgent, self._routine):
            for key in queue:
                if key not in self._writing:
                    return key, queue.pop(key)
        return None

    async def _run(self) -> None:
        assert self._ready is not None
        while True:
            picked = self._next()
            if picked is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            key, item = picked
            self._writing.add(key)
            try:
                await self._write(item)
            except kube.PolicyGone as error:
                # Deleted while its last status waited: nothing to retry, ever.
                logger.info("policy %s: status dropped: %s", key, error)
                self.forget(namespace=item.namespace, name=item.name)
            except kube.KubernetesUnavailable as error:
                logger.warning("policy %s: status not written yet: %s; retrying", key, error)
                self._put_back(key, item)
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:  # a bug here must not end every policy's status updates
                logger.exception("policy %s: writing its status failed", key)
            finally:
                self._writing.discard(key)
                if key in self._urgent or key in self._routine:
                    self._ready.set()

    def _put_back(self, key: str, item: PendingStatus) -> None:
        """A failed write goes behind the others, merged with what came meanwhile."""
        newer = self._urgent.pop(key, None) or self._routine.pop(key, None)
        if newer is not None:
            item.absorb(newer)
        (self._urgent if item.policy_status is not None else self._routine)[key] = item

    async def _write(self, item: PendingStatus) -> None:
        if item.policy_status is not None:
            await self._take_token()
            await asyncio.to_thread(
                kube.patch_policy_status,
                namespace=item.namespace,
                name=item.name,
                status=item.policy_status,
            )
            self.writes += 1
            item.policy_status = None  # a retry after a failure below does not resend it
        if item.processing is not None:
            await self._take_token()
            await asyncio.to_thread(
                kube.write_processing_status,
                namespace=item.namespace,
                name=item.name,
                owner_uid=item.owner_uid,
                status=item.processing,
            )
            self.writes += 1

    async def _take_token(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(
                float(BURST_WRITES), self._tokens + (now - self._refilled) * self.writes_per_second
            )
            self._refilled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.writes_per_second)


WRITER = StatusWriter()


def configure(*, writes_per_second: float) -> None:
    if writes_per_second <= 0:
        raise ValueError(f"status writes per second must be positive, not {writes_per_second}")
    WRITER.writes_per_second = writes_per_second
