"""A throwaway Redis server on a free loopback port.

No persistence by default, so a restart forgets every queued message — exactly the failure
celery-reconciler must survive. ``appendonly=True`` gives the AOF variant for crash tests.
A password is set so broker URLs carry a secret that must never be printed.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
from pathlib import Path

import redis as redis_client

from devstack import processes

# Database 0 is the server's own URL; a test suite takes 1..DATABASES-1, one per test, so
# tests on one server never see each other's queues and never flush anyone else's.
DATABASES = 1024


@dataclasses.dataclass
class RedisServer:
    port: int
    password: str
    process: processes.ManagedProcess

    @property
    def url(self) -> str:
        return self.database_url(0)

    def database_url(self, number: int) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{number}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def client(self) -> redis_client.Redis[bytes]:
        return redis_client.Redis.from_url(self.url)

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(
            lambda: bool(self.client().ping()), timeout_seconds=15, what="answering PING"
        )

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


def start(workdir: Path, *, appendonly: bool = False, port: int | None = None) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise processes.ComponentMissing("redis-server not found — run `make setup`")
    port = port or processes.free_port()
    data_dir = workdir / f"redis-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    process = processes.ManagedProcess(
        name=f"redis:{port}",
        argv=[
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--requirepass",
            password,
            # one database per test on the session's server (tests/conftest.py `redis_url`)
            "--databases",
            str(DATABASES),
            "--daemonize",
            "no",
            # Redis writes its title over its environment by default, and the environment
            # carries the mark by which `devstack down` and the tests find what a run left.
            "--set-proc-title",
            "no",
        ],
        log_path=workdir / f"redis-{port}.log",
    )
    server = RedisServer(port=port, password=password, process=process)
    server.start()
    return server
