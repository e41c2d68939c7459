"""One writer for every policy's status objects: coalesced, and bounded in writes per second.

Each policy's loop decides *what* its ProcessingPolicy status and ProcessingStatus should
say; this module decides *when* the API server hears it. With hundreds of policies, writing
from each loop as it finishes means bursts of hundreds of requests (every loop sweeps at
start-up, and a database that comes back makes every policy change its conditions at once),
each competing with kopf's own watches and with the pod watches that rescues depend on.

So a loop ``submit``s its latest patches and returns at once. Patches of one policy that
wait are merged (they are JSON merge patches of ``status``: the newer value of a field wins,
and ``lastDispatched`` adds up, since each counts what its own sweeps dispatched). One task
sends them in the order the policies first asked, at most ``writes_per_second`` requests
per operator with a small burst, so a policy that keeps changing cannot starve the others.
A write that fails (the API server is away) is put back behind the others and retried; a
policy that is deleted is ``forget``-ten, so nothing is written for it after its loop ends.
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
        self._pending: collections.OrderedDict[str, PendingStatus] = collections.OrderedDict()
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
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
        waiting = self._pending.get(key)
        if waiting is None:
            self._pending[key] = item
        else:
            waiting.absorb(item)
        assert self._ready is not None
        self._ready.set()

    def forget(self, *, namespace: str, name: str) -> None:
        self._pending.pop(f"{namespace}/{name}", None)

    def _start(self) -> None:
        running = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is running:
            return
        self._ready = asyncio.Event()
        self._task = running.create_task(self._run(), name="status-writer")

    async def _run(self) -> None:
        assert self._ready is not None
        while True:
            if not self._pending:
                self._ready.clear()
                await self._ready.wait()
                continue
            key, item = self._pending.popitem(last=False)
            try:
                await self._write(item)
            except kube.KubernetesUnavailable as error:
                logger.warning("policy %s: status not written yet: %s; retrying", key, error)
                newer = self._pending.pop(key, None)
                if newer is not None:
                    item.absorb(newer)
                self._pending[key] = item
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:  # a bug here must not end every policy's status updates
                logger.exception("policy %s: writing its status failed", key)

    async def _write(self, item: PendingStatus) -> None:
        # Sent one at a time: once a request has gone out, a newer submission waits in the
        # queue, so the API server never sees a policy's statuses out of order.
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
