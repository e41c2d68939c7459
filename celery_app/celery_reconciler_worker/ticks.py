"""Ticks: how a process that runs bodies tells its guardian, without I/O, that it still runs.

A process that is paused (SIGSTOP, a frozen cgroup) or whose threads cannot run (a body
holding the GIL in one C call) cannot stop itself: its own watchdog thread never gets to.
So each such process publishes a *tick* that another process reads — the guardian
(``guardian``), and the liveness probe (``probe``) for a container frozen as a whole.

A tick is a fixed-size record in a small file of the worker's run directory, mapped into
memory once: publishing is a few stores into shared memory, no system call, nothing that
can block on a disk, a log handler or the database. Readers map nothing; they read the file,
whose pages are the same memory. A sequence number, odd while a record is being written,
lets a reader recognise a torn read and try again.

The record: the publisher's pid and its own start (``/proc/<pid>/stat`` starttime, so a
reader never mistakes a later process that reused the pid for it), its heartbeat timeout,
``CLOCK_MONOTONIC`` of its last tick (one clock for every process of the node, so readers
compare it with their own), of its last heartbeat that reached the ledger, how many bodies
it runs, and the incarnations they run under.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import threading
import uuid
from pathlib import Path

from celery_reconciler_worker import identity

# Where workers keep their run directories (one per worker, named after its main process).
RUN_ROOT_VARIABLE = "CELERY_RECONCILER_RUN_DIRECTORY"
# Set by the worker's main process for its pool: the directory of its guardian and ticks.
RUN_DIRECTORY_VARIABLE = "CELERY_RECONCILER_GUARDIAN_DIRECTORY"
GUARDIAN_FILE = "guardian.tick"
BODY_FILE_PREFIX = "body-"
BODY_FILE_SUFFIX = ".tick"
# More incarnations than this at once (threads pool bodies outliving several
# re-registrations) are listed up to this many; the guardian ends the current one anyway.
MAX_INCARNATIONS = 8

_HEAD = struct.Struct("<QqQdddqq")  # seq, pid, start, timeout, tick, renewed, running, count
_INCARNATION = struct.Struct("<16s")
SIZE = _HEAD.size + MAX_INCARNATIONS * _INCARNATION.size


@dataclasses.dataclass(frozen=True)
class Tick:
    pid: int
    start_ticks: int
    timeout_seconds: float
    ticked_at: float  # CLOCK_MONOTONIC
    renewed_at: float  # CLOCK_MONOTONIC of the last heartbeat that reached the ledger
    running: int
    incarnations: tuple[uuid.UUID, ...]


def run_root() -> Path:
    """Where the worker's main process makes its run directory and the probe looks."""
    # Not tempfile.gettempdir(): its import alone costs the probe more than its own work.
    return Path(
        os.environ.get(RUN_ROOT_VARIABLE)
        or os.path.join(os.environ.get("TMPDIR") or "/tmp", "celery-reconciler")
    )


def body_file(directory: Path, pid: int) -> Path:
    return directory / f"{BODY_FILE_PREFIX}{pid}{BODY_FILE_SUFFIX}"


def body_files(directory: Path) -> list[Path]:
    try:
        return sorted(directory.glob(f"{BODY_FILE_PREFIX}*{BODY_FILE_SUFFIX}"))
    except OSError:
        return []


class Publisher:
    """The writing side: one per process, its record mapped once at creation."""

    def __init__(self, path: Path, *, pid: int, start_ticks: int) -> None:
        self.path = path
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(descriptor, SIZE)
            self._memory = mmap.mmap(descriptor, SIZE)
        finally:
            os.close(descriptor)
        self._pid, self._start_ticks = pid, start_ticks
        self._sequence = 0
        self._lock = threading.Lock()  # a body thread and the watchdog may both publish

    def publish(
        self,
        *,
        timeout_seconds: float,
        ticked_at: float,
        renewed_at: float,
        running: int,
        incarnations: tuple[uuid.UUID, ...] = (),
    ) -> None:
        with self._lock:
            self._sequence += 1  # odd: being written
            struct.pack_into("<Q", self._memory, 0, self._sequence)
            _pack_into(
                self._memory,
                self._sequence,
                Tick(
                    pid=self._pid,
                    start_ticks=self._start_ticks,
                    timeout_seconds=timeout_seconds,
                    ticked_at=ticked_at,
                    renewed_at=renewed_at,
                    running=running,
                    incarnations=incarnations,
                ),
            )
            self._sequence += 1  # even: whole
            struct.pack_into("<Q", self._memory, 0, self._sequence)


def _pack_into(buffer: bytearray | mmap.mmap, sequence: int, tick: Tick) -> None:
    """The record of ``tick`` under ``sequence``, its first ``MAX_INCARNATIONS`` listed."""
    listed = tick.incarnations[:MAX_INCARNATIONS]
    _HEAD.pack_into(
        buffer,
        0,
        sequence,
        tick.pid,
        tick.start_ticks,
        tick.timeout_seconds,
        tick.ticked_at,
        tick.renewed_at,
        tick.running,
        len(listed),
    )
    for index, incarnation in enumerate(listed):
        _INCARNATION.pack_into(buffer, _HEAD.size + index * _INCARNATION.size, incarnation.bytes)


def encode(tick: Tick, *, sequence: int = 2) -> bytes:
    """``tick`` as a whole record (an even ``sequence``), for a file written at once."""
    data = bytearray(SIZE)
    _pack_into(data, sequence, tick)
    return bytes(data)


def write_whole(path: Path, tick: Tick) -> None:
    """Put ``tick`` at ``path`` in one rename, with no mapping left behind: for a record a
    ``Publisher`` of another process takes over (it opens the same file, truncating it)."""
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_bytes(encode(tick))
    os.replace(staged, path)


def decode(data: bytes) -> Tick | None:
    """The record in ``data``, or ``None`` when it is short or caught mid-write."""
    if len(data) < SIZE:
        return None
    sequence, pid, start, timeout, ticked, renewed, running, count = _HEAD.unpack_from(data)
    if sequence % 2 or sequence == 0:
        return None
    incarnations = tuple(
        uuid.UUID(bytes=_INCARNATION.unpack_from(data, _HEAD.size + index * _INCARNATION.size)[0])
        for index in range(min(count, MAX_INCARNATIONS))
    )
    return Tick(
        pid=pid,
        start_ticks=start,
        timeout_seconds=timeout,
        ticked_at=ticked,
        renewed_at=renewed,
        running=running,
        incarnations=incarnations,
    )


def read(path: Path) -> Tick | None:
    """The last whole record of ``path`` (a few tries past a write in progress)."""
    for _ in range(5):
        try:
            first = path.read_bytes()
            second = path.read_bytes()
        except OSError:
            return None
        if first[:8] == second[:8]:
            found = decode(first)
            if found is not None:
                return found
    return None


def publisher_for_this_process() -> Publisher | None:
    """This process's tick record in its worker's run directory (``None`` without a
    guardian: a body run outside ``celery worker``); ``OSError`` if it cannot be written."""
    directory = os.environ.get(RUN_DIRECTORY_VARIABLE)
    if not directory:
        return None
    pid = os.getpid()
    return Publisher(
        body_file(Path(directory), pid),
        pid=pid,
        start_ticks=identity.process_start_ticks(pid) or 0,
    )
