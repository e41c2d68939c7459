"""The watchdog: the in-process fast path of self-fencing, a thread that does no I/O.

Every ``WATCHDOG_PERIOD_SECONDS`` it asks the incarnation (``incarnation``) whether its
bodies must stop — which also publishes this process's tick for the guardian — and if so
kills the process, and with it every body it runs. It is fast because it is inside the
process; it is not enough alone, because a process that is paused or whose body holds the
GIL never runs it: then the guardian (``guardian``) acts from outside.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

WATCHDOG_PERIOD_SECONDS = 0.25


def stop_own_bodies() -> None:
    """Self-fencing: kill this process, and with it every body it runs, before the operator
    may hand their entries to another worker. The pool (or the kubelet) starts a new one.

    Nothing before the kill: a log handler blocked on its stream (likely in the very
    partition that stopped the heartbeat) would mean no kill. The guardian sees the process
    gone with bodies running and records why."""
    os.kill(os.getpid(), signal.SIGKILL)


def watch_forever(must_stop: Callable[[], bool]) -> None:
    while True:
        time.sleep(WATCHDOG_PERIOD_SECONDS)
        if must_stop():
            stop_own_bodies()


def start(must_stop: Callable[[], bool]) -> None:
    threading.Thread(
        target=watch_forever, args=(must_stop,), name="ledger-watchdog", daemon=True
    ).start()
