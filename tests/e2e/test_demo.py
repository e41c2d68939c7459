"""``make demo`` is the README's first command: it must keep working, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_processes_everything_after_killing_a_worker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devstack", "demo", "--entries", "120", "--task-seconds", "0.05"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "SIGKILL worker insights-worker-0 mid-run" in output
    assert "==> all 120 entries processed, 0 lost, 0 duplicate runs" in output
    assert "rescued:" in output
    leftovers = subprocess.run(
        ["pgrep", "-f", "celery_app.demo worker"], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == [], f"the demo left workers running: {leftovers}"
