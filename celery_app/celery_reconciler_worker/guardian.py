"""The guardian: a process beside the worker that stops a body its own process cannot stop.

A body process that is paused (SIGSTOP) or whose threads cannot run (a body holding the GIL
in one C call) cannot kill itself: its watchdog thread never runs. The guardian is a plain
subprocess that the worker's main process starts at ``worker_init``, for every pool
(prefork children, or the main process itself under solo and threads). It runs no Celery and
no body; it reads the ticks (``ticks``) of the processes that run bodies every
``POLL_SECONDS`` and:

* a process that runs bodies and has not ticked for half its heartbeat timeout is SIGKILLed;
  the guardian waits until it is really gone (no ``/proc/<pid>`` of that start, or a
  zombie), and only **then** records the proof in the ledger: its incarnations end, with the
  reason (``ledger.end_incarnations``). The operator re-dispatches the running entries of an
  ended incarnation, so a re-run starts only after the old body is dead;
* a process that died while running bodies (killed by its own watchdog, the OOM killer, a
  crash) is recorded the same way: the proof that its bodies are gone, before any timeout.

The heartbeat timeout is the operator's bound on silence: a guardian that kills at half of
it has its kill and its proof in before the operator would act on silence alone. The
guardian ticks too, for the liveness probe (``probe``), which covers the one case it cannot:
a container frozen or starved as a whole, guardian included.

Recording retries until it lands (the database may be away); a proof that cannot land within
the heartbeat timeout after the worker is gone is not needed any more (the operator ends a
silent incarnation by itself then), so the guardian exits. It exits as well when its parent
(the worker's main process) is gone and no process it guards runs.

``start`` runs it as ``python -m celery_reconciler_worker.guardian --parent PID --directory DIR
--heartbeat-timeout SECONDS``; the ledger's DSN comes from ``CELERY_RECONCILER_DSN``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

from celery_reconciler_worker import identity, ledger, ticks

POLL_SECONDS = 0.25
DEATH_POLL_SECONDS = 0.01
RETRY_SECONDS = 1.0
DSN_ENVIRONMENT_VARIABLE = "CELERY_RECONCILER_DSN"

logger = logging.getLogger("celery_reconciler_worker.guardian")


@dataclasses.dataclass(frozen=True)
class Proof:
    incarnations: tuple[uuid.UUID, ...]
    reason: str


def is_gone(pid: int, *, start_ticks: int) -> bool:
    """Whether the process ``pid`` that started at ``start_ticks`` no longer runs: no such
    process, a later one that reused the pid, or a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    try:
        if identity.start_ticks_from_stat(stat) != start_ticks:
            return True
        state = stat.rsplit(")", 1)[1].split()[0]
    except (IndexError, ValueError):
        return True
    return state in ("Z", "X")


def stale_seconds(tick: ticks.Tick, *, now: float) -> float:
    return now - tick.ticked_at


def must_kill(tick: ticks.Tick, *, now: float) -> bool:
    """A process that runs bodies and has not ticked for half its heartbeat timeout."""
    return tick.running > 0 and stale_seconds(tick, now=now) > tick.timeout_seconds / 2


def kill_and_wait(tick: ticks.Tick) -> None:
    """SIGKILL the process of ``tick`` and return once it is gone (SIGKILL also ends a
    stopped process; only the kernel can delay it, and then the proof waits too)."""
    try:
        os.kill(tick.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while not is_gone(tick.pid, start_ticks=tick.start_ticks):
        time.sleep(DEATH_POLL_SECONDS)


class Recorder:
    """Writes proofs to the ledger in a thread of its own, so a database that is away
    never delays a kill; each proof is retried until it lands."""

    def __init__(self, *, dsn: str, timeout_seconds: float) -> None:
        self._dsn = dsn
        self._timeout_seconds = timeout_seconds
        self._proofs: queue.Queue[Proof] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._record_forever, name="proof-recorder", daemon=True).start()

    def add(self, proof: Proof) -> None:
        with self._lock:
            self._pending += 1
        self._proofs.put(proof)

    def pending(self) -> int:
        with self._lock:
            return self._pending

    def _record_forever(self) -> None:
        connection: psycopg.Connection[object] | None = None
        while True:
            proof = self._proofs.get()
            while True:
                try:
                    if connection is None or connection.closed:
                        connection = ledger.connect(
                            self._dsn,
                            application_name="celery-worker guardian",
                            connect_timeout_seconds=max(1, int(self._timeout_seconds / 4)),
                            tcp_user_timeout_seconds=self._timeout_seconds / 2,
                            statement_timeout_seconds=self._timeout_seconds / 2,
                            lock_timeout_seconds=self._timeout_seconds / 4,
                        )
                    ended = ledger.end_incarnations(
                        connection, incarnations=proof.incarnations, reason=proof.reason
                    )
                except (ledger.DatabaseUnavailable, psycopg.Error) as error:
                    logger.warning("could not record a proof yet (%s); retrying", error)
                    if connection is not None:
                        connection.close()
                    connection = None
                    time.sleep(RETRY_SECONDS)
                    continue
                logger.warning(
                    "ended %d of incarnations %s: %s",
                    ended,
                    ", ".join(str(incarnation) for incarnation in proof.incarnations),
                    proof.reason,
                )
                break
            with self._lock:
                self._pending -= 1


def _gone(tick: ticks.Tick, *, reason: str, recorder: Recorder) -> None:
    """Say when a process running bodies is known gone — the line chaos runs date the end of
    its bodies' runs by, written before the proof, so before any re-run — then prove it."""
    logger.warning("worker process (pid %d) is gone: %s", tick.pid, reason)
    recorder.add(Proof(tick.incarnations, reason))


def guard_once(directory: Path, *, recorder: Recorder) -> int:
    """One look at every body process of the worker; how many of them still run."""
    running_processes = 0
    for path in ticks.body_files(directory):
        tick = ticks.read(path)
        if tick is None:
            continue
        if is_gone(tick.pid, start_ticks=tick.start_ticks):
            if tick.running > 0 and tick.incarnations:
                reason = (
                    f"its process {tick.pid} died while running {tick.running} bodies "
                    "(seen gone by its worker's guardian)"
                )
                _gone(tick, reason=reason, recorder=recorder)
            path.unlink(missing_ok=True)
            continue
        now = time.monotonic()
        if must_kill(tick, now=now):
            silent = stale_seconds(tick, now=now)
            kill_and_wait(tick)
            reason = (
                f"killed by its worker's guardian after {silent:.1f} s without a tick "
                "(paused or holding the GIL)"
            )
            _gone(tick, reason=reason, recorder=recorder)
            path.unlink(missing_ok=True)
            continue
        running_processes += 1
    return running_processes


def run(*, parent: int, directory: Path, timeout_seconds: float, dsn: str) -> None:
    recorder = Recorder(dsn=dsn, timeout_seconds=timeout_seconds)
    own = ticks.Publisher(
        directory / ticks.GUARDIAN_FILE,
        pid=os.getpid(),
        start_ticks=identity.process_start_ticks(os.getpid()) or 0,
    )
    orphaned_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            own.publish(timeout_seconds=timeout_seconds, ticked_at=now, renewed_at=now, running=0)
            running = guard_once(directory, recorder=recorder)
            if orphaned_at is None and os.getppid() != parent:
                orphaned_at = now
            # Gone with its worker: once nothing it guards runs and its proofs are written
            # (or no longer needed: the operator ends a silent incarnation by itself).
            proofs_done = recorder.pending() == 0 or (
                orphaned_at is not None and now - orphaned_at > timeout_seconds
            )
            if orphaned_at is not None and running == 0 and proofs_done:
                return
            time.sleep(POLL_SECONDS)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def start(*, dsn: str, timeout_seconds: float) -> subprocess.Popen[bytes] | None:
    """Start the guardian of this process (the worker's main process, before its pool
    starts): make its run directory, which the pool's processes find in the environment
    they inherit, and run it. ``None`` when the directory cannot be made."""
    pid = os.getpid()
    directory = ticks.run_root() / f"worker-{pid}-{identity.process_start_ticks(pid) or 0}"
    shutil.rmtree(directory, ignore_errors=True)
    try:
        directory.mkdir(parents=True)
    except OSError as error:
        logger.error(
            "no guardian for this worker: cannot create its run directory %s (%s); set %s "
            "to a writable directory — until then a paused or GIL-bound body is stopped "
            "only by the operator's heartbeat timeout",
            directory,
            error,
            ticks.RUN_ROOT_VARIABLE,
        )
        return None
    os.environ[ticks.RUN_DIRECTORY_VARIABLE] = str(directory)
    # The guardian's first tick, written for it under this process's pid: its own comes only
    # once its imports are done (a second or more on a busy node), and celery may log
    # ``ready.`` before that. A container frozen in between would otherwise have no guardian
    # tick at all, which the liveness probe passes; now it has a silent one, which the probe
    # fails once the timeout has passed. The guardian's publisher takes the file over.
    now = time.monotonic()
    ticks.write_whole(
        directory / ticks.GUARDIAN_FILE,
        ticks.Tick(
            pid=pid,
            start_ticks=identity.process_start_ticks(pid) or 0,
            timeout_seconds=timeout_seconds,
            ticked_at=now,
            renewed_at=now,
            running=0,
            incarnations=(),
        ),
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery_reconciler_worker.guardian",
            "--parent",
            str(pid),
            "--directory",
            str(directory),
            "--heartbeat-timeout",
            str(timeout_seconds),
        ],
        env={**os.environ, DSN_ENVIRONMENT_VARIABLE: dsn},
        stdin=subprocess.DEVNULL,
        # Its own process group: a signal to the worker's group (a terminal's Ctrl-C, a
        # SIGSTOP of the whole worker) does not reach the party that must act on it.
        process_group=0,
    )
    logger.info("guardian started for worker process %d (run directory %s)", pid, directory)
    return process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m celery_reconciler_worker.guardian")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--heartbeat-timeout", type=float, required=True)
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s: %(levelname)s/guardian] %(message)s"
    )
    dsn = os.environ.get(DSN_ENVIRONMENT_VARIABLE)
    if not dsn:
        sys.exit(f"{DSN_ENVIRONMENT_VARIABLE} is not set: the guardian records in the ledger")
    # Stopping the worker (a terminal's Ctrl-C, SIGTERM to its group) must not stop the
    # guardian before the processes it guards are gone: it leaves when they are.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run(
        parent=arguments.parent,
        directory=arguments.directory,
        timeout_seconds=arguments.heartbeat_timeout,
        dsn=dsn,
    )


if __name__ == "__main__":
    main()
