"""The Django example (``examples/mindjourney``) driven by the commands its docs page shows.

docs/coming-from-celery-beat.md walks a reader through the example with one shell block,
marked by ``RUNBOOK_MARK``. ``runbook()`` reads that block, and the e2e test runs exactly
those commands — a ``cd`` moves the following commands, a command ending in `` &`` is a
long-running process (a worker) — so the page cannot drift from what is proven. The reader's
environment (``DATABASE_URL``, ``CELERY_BROKER_URL``, ``KUBECONFIG``) is the test's.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

from devstack import processes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "mindjourney"
RUNBOOK_PAGE = ROOT / "docs" / "coming-from-celery-beat.md"
RUNBOOK_MARK = "<!-- runbook: tests/e2e/test_django_example.py runs these commands -->"


@dataclasses.dataclass(frozen=True)
class Step:
    command: str
    cwd: Path
    background: bool


def runbook(page: Path = RUNBOOK_PAGE) -> list[Step]:
    """The commands of the marked ``sh`` block of ``page``, from the repository's root."""
    lines = page.read_text().splitlines()
    try:
        start = lines.index(RUNBOOK_MARK)
    except ValueError:
        raise AssertionError(f"{page} has no line {RUNBOOK_MARK!r}") from None
    if lines[start + 1] != "```sh":
        raise AssertionError(f"{page}: the line after the runbook mark must open a sh block")
    steps: list[Step] = []
    cwd = ROOT
    for line in lines[start + 2 :]:
        if line == "```":
            return steps
        command = line.strip()
        if not command or command.startswith("#"):
            continue
        if command.startswith("cd "):
            cwd = (cwd / command.removeprefix("cd ").strip()).resolve()
            continue
        background = command.endswith(" &")
        steps.append(Step(command.removesuffix(" &").strip(), cwd, background))
    raise AssertionError(f"{page}: the runbook block is not closed")


def environment(base: dict[str, str], **variables: str) -> dict[str, str]:
    """``base`` (say the control plane's env, with ``KUBECONFIG``) with this interpreter's
    ``python`` and ``celery`` first on ``PATH``, ``variables`` set, and no
    ``CELERY_RECONCILER_DSN``: a Django worker finds the ledger through Django's settings."""
    env = dict(base)
    env.pop("CELERY_RECONCILER_DSN", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(variables)
    return env


def run(step: Step, *, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a foreground step through bash, as a reader pastes it; fail with its output."""
    result = subprocess.run(
        ["bash", "-c", step.command],
        cwd=step.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"runbook command failed ({result.returncode}): {step.command}\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def start(step: Step, *, env: dict[str, str], name: str, log_dir: Path) -> processes.ManagedProcess:
    """Start a background step in its own process group (``kill()`` takes all of it) and
    wait until the Celery worker it runs says it is ready."""
    process = processes.ManagedProcess(
        name=name,
        argv=["bash", "-c", f"cd {shlex.quote(str(step.cwd))} && exec {step.command}"],
        log_path=log_dir / f"{name}.log",
        env=env,
    )
    process.start()
    process.wait_until(
        lambda: " ready." in process.log_path.read_text(errors="replace"),
        timeout_seconds=90,
        what="ready",
    )
    return process
