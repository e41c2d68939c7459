"""Faults a task body stages in its own process, shared by the demo and the chaos app.

A body that holds the GIL in one C call starves every other thread of its process — its
heartbeat and its watchdog among them — so only a party outside the process can stop it
(issue 21). The demo's ``gil`` fault (integration tests) and the chaos driver's
``gil_hold`` fault make such a body the same way, from this module.
"""

from __future__ import annotations

import ctypes


def hold_the_gil(*, seconds: float) -> None:
    """Spend ``seconds`` (whole, at least one) in one C call that keeps the GIL: libc's
    ``sleep`` called through ``PyDLL``, which does not release the GIL (``CDLL`` would)."""
    ctypes.PyDLL(None).sleep(max(1, round(seconds)))
