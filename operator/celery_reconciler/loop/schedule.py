"""When a policy's loop sweeps next, and how it is woken before that.

A loop sleeps until the next sweep is due (``spec.schedule.sweepInterval``, earlier when a
scheduled retry falls due or the dispatch rate allows the next page), or until something
wakes it: a spec change or a request by annotation (``wake``, from the kopf handlers), a
rescue to report, a pod watch that failed. A loop whose sweeps fail backs off
(``ERROR_BACKOFF_SECONDS``) instead of spinning. While work is in flight it refreshes the
status between sweeps, so the counts a person watches move.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from celery_reconciler import planning, reconcile
from celery_reconciler import policy as policy_module

ERROR_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
INVALID_SPEC_RECHECK_SECONDS = 300.0
STATUS_LIVE_REFRESH_SECONDS = 2.0
# While a silent worker process in a Pod holds entries (its deadline already passed), the
# loop looks at its Pod again this often rather than at once and forever.
SILENT_WORKER_RECHECK_SECONDS = 2.0

# Wake-up events of the running loops by policy key, for handlers that must poke a loop.
_WAKERS: dict[str, asyncio.Event] = {}


def wake(policy_key: str) -> bool:
    waker = _WAKERS.get(policy_key)
    if waker is None:
        return False
    waker.set()
    return True


def backoff_seconds(failures: int) -> float:
    """How long to wait after ``failures`` failures in a row (at least one)."""
    return ERROR_BACKOFF_SECONDS[min(failures, len(ERROR_BACKOFF_SECONDS)) - 1]


class SweepSchedule:
    def __init__(self, *, policy_key: str) -> None:
        self.policy_key = policy_key
        self.waker = asyncio.Event()
        self.pacing = planning.RatePacing()

    def register(self) -> None:
        """Let ``wake(policy_key)`` reach this loop (until ``unregister``)."""
        _WAKERS[self.policy_key] = self.waker

    def unregister(self) -> None:
        _WAKERS.pop(self.policy_key, None)

    def wake_now(self) -> None:
        self.waker.set()

    async def wait_for_next_sweep(
        self,
        delay_seconds: float,
        stopped: Any,
        *,
        work_in_flight: Callable[[], bool],
        refresh_status: Callable[[], Awaitable[bool]],
    ) -> None:
        """Sleep until the next sweep; while work is in flight, refresh the status meanwhile.

        Between sweeps nothing is dispatched, but workers keep finishing entries: a person
        watching ``kubectl get processingstatus`` should see the counts move, not freeze for
        a whole sweep interval. Refreshing costs two index-backed counts, no sweep. What it
        reads also ends the sleep early (``refresh_status`` returns True) when something
        fell due that the sweep could not foresee: a body started since, whose worker went
        silent (``planning.sweep_early``).
        """
        deadline = time.monotonic() + delay_seconds
        while True:
            remaining = deadline - time.monotonic()
            busy = work_in_flight()
            chunk = min(remaining, STATUS_LIVE_REFRESH_SECONDS) if busy else remaining
            woken = await self.sleep(chunk, stopped)
            if woken or stopped or time.monotonic() >= deadline:
                return
            if await refresh_status():
                return  # a worker went silent, or a retry or lease fell due, since the sweep

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

    def holds_dispatch(self, policy: policy_module.Policy) -> bool:
        """Whether the dispatch rate holds this sweep's dispatching back."""
        rate = policy.limits.dispatch_per_second
        return self.pacing.holds(dispatch_per_second=rate, now=time.monotonic())

    def dispatched(self, result: reconcile.SweepResult) -> None:
        self.pacing.swept(
            rate_allows_in_seconds=result.rate_allows_in_seconds, now=time.monotonic()
        )

    def next_sweep_in_seconds(
        self,
        policy: policy_module.Policy,
        counts: reconcile.StatusSnapshot,
        *,
        silent_worker_holds: bool,
        status_write_in_seconds: float | None,
    ) -> float:
        """After a sweep that worked: the interval, or sooner when a retry falls due or the
        rate allows the next page; never at once while a silent worker holds entries; no
        later than a status write held back is due."""
        delay = policy.schedule.sweep_interval_seconds
        if not policy.schedule.suspend:
            delay = planning.next_wakeup_seconds(
                sweep_interval_seconds=delay,
                earliest_retry_in_seconds=counts.seconds_until_next_due,
                rate_allows_in_seconds=self.pacing.allows_in_seconds(now=time.monotonic()),
            )
        if silent_worker_holds:
            delay = max(delay, SILENT_WORKER_RECHECK_SECONDS)
        if status_write_in_seconds is not None:
            delay = min(delay, status_write_in_seconds)
        return delay
