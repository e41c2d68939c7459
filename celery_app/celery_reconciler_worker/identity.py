"""Which container instance this worker process runs in, as the node sees it.

A pod event names a container instance two ways: its runtime id
(``containerStatuses[].containerID``) and its start (``state.running.startedAt``, on the
node's clock, whole seconds). A worker records both in its incarnation, so the operator can
end exactly the incarnations whose container is no longer the running one, with no clock
comparison between the node and the database.

* The **container id** shows in the cgroup path on cgroup v1 and on v2 without a private
  cgroup namespace (``/kubepods/burstable/pod<uid>/<64 hex>``, or the systemd driver's
  ``kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<64 hex>.scope``). A
  private cgroup namespace (the default on v2) shows ``0::/`` and nothing else; the mount
  table sometimes still shows it (the root of a cgroup mount). Only a path that names our
  pod counts, so a process outside Kubernetes never claims an id.
* The **container start** is when the container's PID 1 started: field 22 of
  ``/proc/1/stat`` (clock ticks since boot) plus ``btime`` of ``/proc/stat`` (the node's
  boot, in seconds of its wall clock). It works on every cgroup version, but only when PID 1
  is our container's own first process: not with ``shareProcessNamespace`` (PID 1 is the
  pod's ``/pause``) nor ``hostPID`` (PID 1 is the node's init) — both are recognised because
  PID 1 then sits in another cgroup than we do — and only in a container of the pod (the
  cgroup path names it, or a private cgroup namespace shows ``0::/``).

The parsers are pure functions over the files' text; the readers around them are thin and
return ``None`` when a file cannot be read. The incarnation records them with what the
Downward API tells the process (``CELERY_RECONCILER_POD_*``); ``$HOSTNAME`` is only a
display name (``worker_name``). The liveness probe imports this module: it imports nothing
beyond a few light standard modules (the probe runs every few seconds in every worker pod).
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

WORKER_ENVIRONMENT_VARIABLE = "HOSTNAME"
# Set these from the Downward API (see docs/concepts.md): they tie a worker process to the
# pod uid a pod event names. Without them a worker is judged by its heartbeat alone.
POD_NAME_VARIABLE = "CELERY_RECONCILER_POD_NAME"
POD_NAMESPACE_VARIABLE = "CELERY_RECONCILER_POD_NAMESPACE"
POD_UID_VARIABLE = "CELERY_RECONCILER_POD_UID"
CONTAINER_NAME_VARIABLE = "CELERY_RECONCILER_CONTAINER_NAME"

_CONTAINER_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
# Field 22 of /proc/<pid>/stat is the 20th after the closing parenthesis of ``comm``.
_STARTTIME_AFTER_COMM = 19


def pod_marks(pod_uid: str) -> tuple[str, str]:
    """How a cgroup path names the pod: cgroupfs keeps the uid's dashes, systemd turns them
    into underscores (a dash is its slice separator)."""
    return f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}"


def _id_in_paths(paths: list[str], *, pod_uid: str) -> str | None:
    for path in paths:
        for mark in pod_marks(pod_uid):
            _, named, below_the_pod = path.partition(mark)
            # The container's own id is the last one below the pod's level.
            found = _CONTAINER_ID.findall(below_the_pod) if named else []
            if found:
                return str(found[-1])
    return None


def container_id_from_cgroup(text: str, *, pod_uid: str) -> str | None:
    """The container id in ``/proc/self/cgroup`` (``hierarchy:controllers:path`` lines)."""
    return _id_in_paths([line.split(":", 2)[-1] for line in text.splitlines()], pod_uid=pod_uid)


def container_id_from_mountinfo(text: str, *, pod_uid: str) -> str | None:
    """The container id in ``/proc/self/mountinfo``: the *root* (field 4) of a cgroup mount
    is the container's cgroup path wherever the namespace does not hide it."""
    roots = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and " - cgroup" in line:
            roots.append(fields[3])
    return _id_in_paths(roots, pod_uid=pod_uid)


def start_ticks_from_stat(text: str) -> int:
    """Field 22 (``starttime``, clock ticks after boot) of a ``/proc/<pid>/stat`` line.

    Field 2 is ``(comm)``, which may itself hold spaces and parentheses: the fields that
    follow start after its *last* closing parenthesis."""
    after_comm = text.rsplit(")", 1)[1].split()
    return int(after_comm[_STARTTIME_AFTER_COMM])


def boot_time_from_proc_stat(text: str) -> int:
    """``btime`` of ``/proc/stat``: the node's boot, in seconds since the epoch."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "btime":
            return int(value)
    raise ValueError("/proc/stat has no btime line")


def started_at(*, start_ticks: int, boot_time: int, ticks_per_second: int) -> datetime.datetime:
    """A process's start on the node's wall clock, from its ``starttime`` and ``btime``."""
    seconds = boot_time + start_ticks / ticks_per_second
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def in_a_container_of(text: str, *, pod_uid: str) -> bool:
    """Whether ``/proc/self/cgroup`` places us in a container of the pod: the path names the
    pod, or the cgroup namespace is private (cgroup v2 only, at its root: ``0::/``, what a
    container sees by default). A process that only carries a pod's Downward API variables
    (a worker run by hand or by a test bed on the host) is in neither, and must not take
    the host's PID 1 for its container's."""
    lines = [line for line in text.splitlines() if line]
    if lines == ["0::/"]:
        return True
    return any(mark in line.split(":", 2)[-1] for line in lines for mark in pod_marks(pod_uid))


def is_pause(cmdline: bytes) -> bool:
    """Whether ``/proc/1/cmdline`` is the pod's sandbox process (``/pause``)."""
    argv0 = cmdline.split(b"\0", 1)[0]
    return os.path.basename(argv0) == b"pause"


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def container_id(pod_uid: str | None) -> str | None:
    """This process's container id, when its pod is known and a path shows the id."""
    if not pod_uid:
        return None
    for path, parse in (
        ("/proc/self/cgroup", container_id_from_cgroup),
        ("/proc/self/mountinfo", container_id_from_mountinfo),
    ):
        text = _read_text(path)
        found = parse(text, pod_uid=pod_uid) if text is not None else None
        if found:
            return found
    return None


def process_start_ticks(pid: int) -> int | None:
    """``starttime`` of a process, ``None`` if it is gone: with its pid it names one process
    for good (a pid alone may be reused by a later one)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    try:
        return start_ticks_from_stat(text)
    except (IndexError, ValueError):
        return None


def container_started_at(pod_uid: str | None) -> datetime.datetime | None:
    """When this process's container's PID 1 started, on the node's clock; ``None`` outside a
    pod, or where PID 1 is not our container's (a shared or the host's PID namespace)."""
    if not pod_uid:
        return None
    try:
        if is_pause(Path("/proc/1/cmdline").read_bytes()):
            return None
    except OSError:
        return None
    ours, first = _read_text("/proc/self/cgroup"), _read_text("/proc/1/cgroup")
    if ours is None or ours != first or not in_a_container_of(ours, pod_uid=pod_uid):
        return None
    start_ticks, proc_stat = process_start_ticks(1), _read_text("/proc/stat")
    if start_ticks is None or proc_stat is None:
        return None
    try:
        boot_time = boot_time_from_proc_stat(proc_stat)
    except ValueError:
        return None
    return started_at(
        start_ticks=start_ticks,
        boot_time=boot_time,
        ticks_per_second=os.sysconf("SC_CLK_TCK"),
    )


def worker_name() -> str:
    """The display name of this worker (the ledger's ``worker`` column)."""
    return os.environ.get(WORKER_ENVIRONMENT_VARIABLE) or os.uname().nodename
