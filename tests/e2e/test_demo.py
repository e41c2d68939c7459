"""``make demo`` is the README's first command: it must keep working, end to end — with the
restart done by the kubelet and the summary read from the database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_processes_everything_after_killing_a_worker() -> None:
    marker = f"demo-test-{uuid.uuid4().hex}"
    result = subprocess.run(
        [sys.executable, "-m", "devstack", "demo", "--entries", "120", "--task-seconds", "0.05"],
        cwd=ROOT,
        env={**os.environ, "CELERY_RECONCILER_TEST_MARKER": marker},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "SIGKILL the main process" in output
    # `kubectl get pods` after the kill: the kubelet restarted the container (RESTARTS 1).
    assert re.search(r"demo-worker-\S+\s+1/1\s+Running\s+1 ", output), output[-4000:]
    assert re.search(r"restarts: +\S+: 1 \(counted by the kubelet\)", output)
    assert "==> all 120 entries processed, 0 lost, 0 duplicate runs" in output
    assert re.search(r"rescued: +[1-9]\d* entries held by \S+demo-worker", output)
    assert processes_carrying(marker) == [], "the demo left processes running"


def processes_carrying(marker: str) -> list[str]:
    """Command lines of live processes that inherited the demo run's environment marker."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return found
