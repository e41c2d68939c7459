"""Start and stop the servers of the local stack as plain child processes.

Every server is a ``ManagedProcess``: started in its own session (so a Ctrl-C aimed at
pytest or the demo does not reach it half-way), logging to a file that a failing test
prints, and stopped by PID — gently first, then with SIGKILL. A registry of what is
running lets the test harness show the right logs when something fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

RUNNING: dict[str, ManagedProcess] = {}


class ComponentMissing(RuntimeError):
    """A real server binary is not installed; the fix is ``make setup``, never a skip."""


class StartupFailed(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def log_tail(path: Path, *, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass
class ManagedProcess:
    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    user: str | None = None
    # A process that must not see this checkout (``celery -A`` puts its cwd on sys.path).
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                user=self.user,
                cwd=self.cwd,
                start_new_session=True,
            )
        RUNNING[self.name] = self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_until(self, ready: Callable[[], bool], *, timeout_seconds: float, what: str) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if not self.running():
                raise StartupFailed(
                    f"{self.name} exited before {what}; last log lines of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.1)
        # A server that never became ready must not outlive the failure it caused.
        self.kill()
        raise StartupFailed(
            f"{self.name} not {what} after {timeout_seconds:.0f}s; last log lines of "
            f"{self.log_path}:\n" + log_tail(self.log_path)
        )

    def stop(self, *, timeout_seconds: float = 10.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.kill()
        RUNNING.pop(self.name, None)

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash or an OOM kill looks like."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        RUNNING.pop(self.name, None)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_pid(pid: int, *, timeout_seconds: float = 10.0) -> None:
    """Stop a process group started by an earlier ``make stack-up``, by its recorded PID."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def pids_carrying(*, variable: str, value: str) -> set[int]:
    """Live processes (not this one) with ``variable=value`` in their environment: what a
    process started, and its children started in turn, even after it died without telling
    anyone their PIDs. A zombie's environ reads empty, so it never counts."""
    wanted = f"{variable}={value}".encode()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if wanted in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
    return found


def stop_carrying(*, variable: str, value: str, timeout_seconds: float = 10.0) -> None:
    """Stop every process ``pids_carrying`` finds: SIGTERM, then SIGKILL what is left."""
    for pid in pids_carrying(variable=variable, value=value):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not pids_carrying(variable=variable, value=value):
            return
        time.sleep(0.1)
    # Looped: a parent that is killed only now may have started a child meanwhile.
    for _ in range(50):
        left = pids_carrying(variable=variable, value=value)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so every exit path runs the clean-up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for(
    condition: Callable[[], Any], *, timeout_seconds: float, what: str, interval: float = 0.5
) -> Any:
    """Poll until ``condition()`` is truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout_seconds
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout_seconds:.0f}s waiting for {what}; last: {last!r}"
    )
