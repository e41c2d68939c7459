"""The liveness probe: fails when a whole worker container is frozen or starved.

The guardian (``guardian``) stops a body process that cannot stop itself, but it runs in the
same container: when the container is frozen or starved as a whole, it is stuck too. Then
only the kubelet can act, and this probe is what tells it to — an exec probe
(``python -m celery_reconciler_worker.probe``, or the ``celery-reconciler-probe`` script) in
the worker's container. It exits non-zero when, in any worker run directory whose worker
still runs, the guardian's tick or the tick of a process running bodies is older than the
heartbeat timeout — twice the guardian's own rule for a body, so a stale body the probe sees
is one the guardian failed to kill, and a node too busy to run the guardian for a moment
(its tick late by seconds) never restarts a healthy worker: a Pod's work moves only on
proof, so nothing races the kill. The kubelet's kill then lands ``timeout +
failureThreshold x periodSeconds`` (+ the probe's own timeout when the container is frozen,
+ the grace period: a frozen process never acts on SIGTERM) after the container stopped
ticking. A worker writes its guardian's first tick itself as it starts it, so a guardian
still importing counts as silent from then on: a container frozen before its guardian ever
ticked fails too. A worker that has not reached its guardian yet passes (the probe's
``initialDelaySeconds`` covers the start), so does a container with no worker directory.

It only reads small files (``ticks``): no database, no broker, no Celery import.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from celery_reconciler_worker import identity, ticks


def _running_worker(directory: Path) -> int | None:
    """The pid of the worker whose run directory this is, ``None`` when it no longer runs (a
    run directory is named ``worker-<pid>-<start ticks>`` after its worker's process)."""
    try:
        _, pid, start_ticks = directory.name.split("-")
        runs = identity.process_start_ticks(int(pid)) == int(start_ticks)
    except ValueError:
        return None
    return int(pid) if runs else None


def problems(root: Path, *, now: float) -> list[str]:
    """What is stale under ``root``, one line each; empty when the container is alive."""
    found = []
    for directory in sorted(root.glob("worker-*")):
        worker_pid = _running_worker(directory)
        if worker_pid is None:
            continue
        guardian = ticks.read(directory / ticks.GUARDIAN_FILE)
        if guardian is not None:
            late = now - guardian.ticked_at
            if late > guardian.timeout_seconds:
                if guardian.pid == worker_pid:  # the record its worker wrote when starting it
                    found.append(
                        f"{directory.name}: guardian silent for {late:.1f} s since it was "
                        "started (it never ticked)"
                    )
                else:
                    found.append(
                        f"{directory.name}: guardian {guardian.pid} silent for {late:.1f} s"
                    )
            if identity.process_start_ticks(guardian.pid) != guardian.start_ticks:
                found.append(f"{directory.name}: guardian {guardian.pid} is gone")
        for path in ticks.body_files(directory):
            tick = ticks.read(path)
            if tick is None or tick.running == 0:
                continue
            if identity.process_start_ticks(tick.pid) != tick.start_ticks:
                continue  # gone: the guardian records it
            late = now - tick.ticked_at
            if late > tick.timeout_seconds:
                found.append(
                    f"{directory.name}: process {tick.pid} running {tick.running} bodies "
                    f"silent for {late:.1f} s"
                )
    return found


def main() -> None:
    found = problems(ticks.run_root(), now=time.monotonic())
    for line in found:
        print(line, file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
