"""`make stack-up` starts what the docs say, and its env.sh sets what the apps read.

Issue 24: the stack started no RabbitMQ though docs/development.md said it did, and env.sh
exported ``BROKER_URL``, which the ``celery`` command reads as its ``--broker``: the
operator published to one broker while the workers consumed another, and nothing said so.
Here ``python -m devstack up`` runs for real in a folder of its own, every server it names
is asked to answer, and ``down`` stops them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import celery
import psycopg
import pytest
import redis as redis_client

from devstack import processes

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DEVELOPMENT_DOC = ROOT / "docs" / "development.md"


def devstack_env(stack_dir: Path, marker: str) -> dict[str, str]:
    """The environment of a `devstack` command: its own stack folder, and a marker every
    process it starts inherits, so the test can find what it left running."""
    env = {
        **os.environ,
        "CELERY_RECONCILER_STACK_DIR": str(stack_dir),
        "CELERY_RECONCILER_TEST_MARKER": marker,
    }
    env.pop("BROKER_URL", None)
    return env


def devstack(command: str, stack_dir: Path, marker: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", command],
        cwd=ROOT,
        env=devstack_env(stack_dir, marker),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def processes_carrying(marker: str) -> dict[int, str]:
    """PID -> command line of the live processes that inherited ``marker`` in their
    environment (a zombie has an empty environ, so it never counts)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(proc.name)] = cmdline.decode(errors="replace")
        except OSError:
            continue
    return found


def kill_leftovers(marker: str) -> dict[int, str]:
    """SIGKILL what a failed run left behind, so one failure does not load the next tests;
    returns what it found."""
    leftovers = processes_carrying(marker)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def sourced(env_file: Path) -> dict[str, str]:
    """The environment a person gets from `source env.sh` in a clean shell."""
    printed = subprocess.run(
        ["bash", "-c", f"unset BROKER_URL; source {env_file} && env -0"],
        capture_output=True,
        text=True,
        check=True,
        env={
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "BROKER_URL": "redis://stale-from-an-old-shell/0",
        },
    ).stdout
    return dict(item.split("=", 1) for item in printed.split("\0") if "=" in item)


def test_stack_up_starts_every_server_the_docs_name_and_env_sh_sets_what_the_apps_read() -> None:
    # Short: containerd's sockets live below it, and a unix socket path has 104 bytes at most.
    stack_dir = Path(tempfile.mkdtemp(prefix="stack-", dir="/tmp"))
    marker = f"stack-test-{uuid.uuid4().hex}"
    started = devstack("up", stack_dir, marker)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "RabbitMQ" in started.stdout
        env = sourced(stack_dir / "env.sh")
        assert "BROKER_URL" not in env
        assert env["CELERY_BROKER_URL"] == env["REDIS_URL"]
        assert env["CELERY_RECONCILER_DSN"] == env["DATABASE_URL"]

        with psycopg.connect(env["DATABASE_URL"], connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert redis_client.Redis.from_url(env["REDIS_URL"]).ping() is True
        app = celery.Celery("stack-check", broker=env["RABBITMQ_URL"], set_as_current=False)
        try:
            with app.connection_for_write(connect_timeout=5) as connection:
                connection.connect()
                assert connection.connected
        finally:
            app.close()
        nodes = subprocess.run(
            ["kubectl", "get", "nodes", "--no-headers"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert re.search(r"\sReady\s", nodes), nodes

        # What the docs tell a person env.sh sets is what it sets.
        documented = DEVELOPMENT_DOC.read_text()
        line = next(line for line in documented.splitlines() if "source .stack/env.sh" in line)
        for name in ("KUBECONFIG", "DATABASE_URL", "CELERY_BROKER_URL", "RABBITMQ_URL"):
            assert name in line, line
        assert "BROKER_URL," not in line.replace("CELERY_BROKER_URL", "")
    finally:
        state_file = stack_dir / "state.json"
        pids = json.loads(state_file.read_text())["pids"] if state_file.exists() else []
        stopped = devstack("down", stack_dir, marker)
        leftovers = kill_leftovers(marker)
    shutil.rmtree(stack_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert len(pids) >= 7  # etcd, apiserver, controller-manager, RabbitMQ, epmd, Redis, PostgreSQL
    assert [pid for pid in pids if processes.pid_alive(pid)] == []
    assert leftovers == {}, "`down` left processes of the stack running"


def test_down_stops_what_an_up_killed_before_it_finished_had_started() -> None:
    """`up` SIGKILLed half-way (a CI timeout, the OOM killer, a second Ctrl-C) runs no
    clean-up of its own: `down` must still find and stop every server it had started."""
    stack_dir = Path(tempfile.mkdtemp(prefix="stack-", dir="/tmp"))
    marker = f"stack-test-{uuid.uuid4().hex}"
    up = subprocess.Popen(
        [sys.executable, "-m", "devstack", "up"],
        cwd=ROOT,
        env=devstack_env(stack_dir, marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # PostgreSQL accepts queries before `up` starts Redis: killed now, `up` has a
        # server running and nothing of the whole stack recorded.
        processes.wait_for(
            lambda: (stack_dir / "redis").exists() or up.poll() is not None,
            timeout_seconds=300,
            what="`up` to have started PostgreSQL",
            interval=0.05,
        )
        assert up.poll() is None, f"`up` exited early ({up.returncode})"
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=30)
        servers = processes_carrying(marker)
        stopped = devstack("down", stack_dir, marker)
        leftovers = processes_carrying(marker)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=30)
        killed = kill_leftovers(marker)
        shutil.rmtree(stack_dir, ignore_errors=True)
    assert any("postgres" in argv for argv in servers.values()), servers
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert leftovers == {}, f"`down` left the half-started stack running: {killed}"
