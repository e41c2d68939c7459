"""The threads Lease I/O runs on, apart from the event loop's default executor.

Two sets: renewals and listings of member Leases on one, policy Lease reads and writes on
the other. The default executor runs every sweep, and a few long sweeps there would hold up
the renewals until the others count this replica dead; likewise a takeover of many policies
at once must not queue this replica's renewal, nor a renewal queue the takeover.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Policy Lease reads and writes at once: a takeover moves a third of the policies (with 3
# replicas), two round trips each.
POLICY_LEASE_THREADS = 8


class LeaseThreads:
    def __init__(self) -> None:
        # One thread each for renewing and listing, and enough for policy Leases that a
        # takeover's reads and writes do not queue.
        self.member_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="member-lease"
        )
        self.policy_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=POLICY_LEASE_THREADS, thread_name_prefix="policy-lease"
        )

    async def call(self, function: Callable[..., T], **kwargs: Any) -> T:
        """A policy Lease read or write, in a thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.policy_executor, functools.partial(function, **kwargs)
        )

    async def call_member(self, function: Callable[..., T], **kwargs: Any) -> T:
        """A renewal or listing of member Leases, in a thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.member_executor, functools.partial(function, **kwargs)
        )
