"""A throwaway RabbitMQ node on free loopback ports, run as a process of our own.

The Debian package's system service is never used: its node name, ports, Erlang cookie and
data directory are machine-wide, so two test sessions (or two engineers) would share one
broker. Each node here gets its own:

* AMQP port (``RABBITMQ_NODE_PORT``) and Erlang distribution port (``RABBITMQ_DIST_PORT``),
* its own ``epmd`` on its own port (``ERL_EPMD_PORT``), started by us in the foreground as
  a ``ManagedProcess``: an ``epmd`` that Erlang starts by itself daemonizes and would
  outlive the node (and the session),
* a unique node name ``cr-<port>@localhost``, data (``RABBITMQ_MNESIA_BASE``), config and
  ``HOME`` (so the Erlang cookie) under the given directory,
* a user with a random password, so AMQP URLs carry a secret that must never be printed.

Durable queues and persistent messages survive ``restart()`` (same node name, same data
directory): a RabbitMQ restart is a different failure from a Redis one without persistence.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import celery

from devstack import processes

# Where the Debian package puts the real start script (/usr/sbin/rabbitmq-server is a
# wrapper that switches to the system service's user and data).
SERVER_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CONTROL_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
VHOST_NAME = re.compile(r"[A-Za-z0-9_-]+")
# A node boots in a few seconds when idle; the test bed's machine is shared and busy.
BOOT_TIMEOUT_SECONDS = 120


@dataclasses.dataclass
class RabbitMQServer:
    port: int
    user: str
    password: str
    process: processes.ManagedProcess
    epmd: processes.ManagedProcess

    @property
    def url(self) -> str:
        return self.url_for_vhost("/")

    def url_for_vhost(self, vhost: str) -> str:
        quoted = urllib.parse.quote(vhost, safe="")
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/{quoted}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def add_vhost(self, vhost: str) -> str:
        """Create a virtual host the user may use fully and return its URL: a test's own empty
        set of queues on a shared node, far cheaper than a node per test. One ``rabbitmqctl
        eval`` (each rabbitmqctl call boots an Erlang VM) instead of two commands."""
        if not VHOST_NAME.fullmatch(vhost):
            raise ValueError(f"vhost {vhost!r} must match {VHOST_NAME.pattern}")
        expression = (
            f'ok = rabbit_vhost:add(<<"{vhost}">>, <<"devstack">>), '
            f'ok = rabbit_auth_backend_internal:set_permissions(<<"{self.user}">>, '
            f'<<"{vhost}">>, <<".*">>, <<".*">>, <<".*">>, <<"devstack">>).'
        )
        done = subprocess.run(
            [str(CONTROL_SCRIPT), "eval", expression],
            env=self.process.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl could not add vhost {vhost}: {done.stderr[-2000:]}")
        return self.url_for_vhost(vhost)

    def accepts_logins(self) -> bool:
        app = celery.Celery("devstack", broker=self.url, set_as_current=False)
        try:
            with app.connection_for_write(connect_timeout=2) as connection:
                connection.connect()
                return bool(connection.connected)
        finally:
            app.close()

    def start(self) -> None:
        if not self.epmd.running():
            self.epmd.start()
            self.epmd.wait_until(
                lambda: processes.port_accepts(int((self.epmd.env or {})["ERL_EPMD_PORT"])),
                timeout_seconds=15,
                what="listening",
            )
        self.process.start()
        self.process.wait_until(
            self.accepts_logins, timeout_seconds=BOOT_TIMEOUT_SECONDS, what="accepting logins"
        )

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: the node syncs its queues and stops)."""
        self.process.stop(timeout_seconds=60)

    def kill(self) -> None:
        self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop the node and its epmd."""
        self.stop()
        self.epmd.stop()


def start(workdir: Path, *, port: int | None = None) -> RabbitMQServer:
    if not SERVER_SCRIPT.exists() or shutil.which("epmd") is None:
        raise processes.ComponentMissing(
            "rabbitmq-server (the Debian package) not found — run `make setup`"
        )
    port = port or processes.free_port()
    base = workdir / f"rabbitmq-{port}"
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    user, password = "celery", secrets.token_urlsafe(16)
    config_file = base / "rabbitmq.conf"
    config_file.write_text(
        f"listeners.tcp.1 = 127.0.0.1:{port}\n"
        f"default_user = {user}\n"
        f"default_pass = {password}\n"
        "default_vhost = /\n"
        # The shared test machine's disk may be fuller than RabbitMQ's 50 MB default likes
        # to see before blocking publishers; the bed's messages are tiny.
        "disk_free_limit.absolute = 1MB\n"
        "log.console = true\n"
        "log.console.level = info\n"
        "log.file = false\n"
    )
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq-env.conf").write_text("")
    epmd_port = processes.free_port()
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        ERL_EPMD_PORT=str(epmd_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_NODENAME=f"cr-{port}@localhost",
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(processes.free_port()),
        RABBITMQ_CONFIG_FILE=str(config_file),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
        RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
        RABBITMQ_LOGS="-",
    )
    epmd = processes.ManagedProcess(
        name=f"epmd:{epmd_port}",
        argv=[str(shutil.which("epmd")), "-port", str(epmd_port), "-address", "127.0.0.1"],
        log_path=workdir / f"epmd-{epmd_port}.log",
        env=env,
    )
    process = processes.ManagedProcess(
        name=f"rabbitmq:{port}",
        argv=[str(SERVER_SCRIPT)],
        log_path=workdir / f"rabbitmq-{port}.log",
        env=env,
    )
    server = RabbitMQServer(port=port, user=user, password=password, process=process, epmd=epmd)
    server.start()
    return server
