"""A throwaway PostgreSQL cluster of our own (``initdb`` + ``postgres``), not the system service.

initdb refuses to run as root, so when we are root the cluster belongs to the ``postgres``
system user and lives in a directory that user owns. Password authentication is on, on
purpose: the DSNs the tests hand around carry a real password, which is what lets tests prove
that no DSN or password leaks into logs, status or events.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from devstack import processes

SUPERUSER = "postgres"


def find_bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise processes.ComponentMissing(
        "PostgreSQL server binaries (initdb, postgres) not found — run `make setup`"
    )


@dataclasses.dataclass
class PostgresServer:
    data_dir: Path
    port: int
    password: str
    process: processes.ManagedProcess

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(
            lambda: _accepts_queries(self.dsn), timeout_seconds=30, what="accepting queries"
        )

    def stop(self) -> None:
        # SIGTERM is PostgreSQL's "smart" shutdown, which waits for clients; SIGINT is "fast".
        if self.process.popen is not None and self.process.running():
            self.process.popen.send_signal(2)
        self.process.stop(timeout_seconds=15)

    def kill(self) -> None:
        self.process.kill()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def _accepts_queries(dsn: str) -> bool:
    with psycopg.connect(dsn, connect_timeout=2) as conn:
        conn.execute("SELECT 1")
    return True


def start(workdir: Path | None = None, *, port: int | None = None) -> PostgresServer:
    """initdb a fresh cluster and start it on a free loopback port."""
    bin_dir = find_bin_dir()
    as_root = os.geteuid() == 0
    # /tmp/pytest-of-root/... is mode 0700, so the postgres user needs a home of its own.
    home = Path(tempfile.mkdtemp(prefix="cr-postgres-", dir=None if as_root else workdir))
    data_dir = home / "data"
    user = SUPERUSER if as_root else None
    if as_root:
        entry = pwd.getpwnam(SUPERUSER)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    password = secrets.token_urlsafe(16)
    password_file = home / "pwfile"
    password_file.write_text(password + "\n")
    if as_root:
        os.chown(password_file, pwd.getpwnam(SUPERUSER).pw_uid, -1)
    subprocess.run(
        [
            str(bin_dir / "initdb"),
            "--pgdata",
            str(data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "scram-sha-256",
            "--pwfile",
            str(password_file),
            "--encoding",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        user=user,
    )
    password_file.unlink()
    port = port or processes.free_port()
    process = processes.ManagedProcess(
        name=f"postgres:{port}",
        argv=[
            str(bin_dir / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={home}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
            "-c",
            "log_min_messages=warning",
        ],
        log_path=(workdir or home) / f"postgres-{port}.log",
        user=user,
    )
    server = PostgresServer(data_dir=data_dir, port=port, password=password, process=process)
    server.start()
    return server
