"""Integration fixtures: the demo schema in a fresh database, and real ``celery worker``s.

Workers are ``celery -A celery_app.demo worker`` subprocesses started through devstack's
``ManagedProcess`` — each in its own process group, so ``kill()`` is a ``kill -9`` of the
whole worker (main process and pool children) like a crashed pod, and each logging to a file
that a failing test prints. Their ``HOSTNAME`` is the worker name the ledger records.

Plain helpers (sweep loops, run analysis) are in ``reconcile_support``.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from reconcile_support import Worker, WorkerFactory

from celery_app.demo import schema
from devstack import processes

REPOSITORY = Path(__file__).resolve().parents[2]
_worker_numbers = itertools.count(1)


@pytest.fixture
def demo_dsn(database_dsn: str) -> str:
    """A fresh database holding the demo's tables (and nothing else)."""
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        schema.create_schema(conn)
    return database_dsn


@pytest.fixture
def conn(demo_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(demo_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """``start_worker(broker_url=..., dsn=..., concurrency=2, lease_seconds=...)``."""
    started: list[Worker] = []

    def start(
        *,
        broker_url: str,
        dsn: str,
        concurrency: int = 2,
        lease_seconds: float = 900.0,
        app: str = "celery_app.demo",
        queue: str = "insights",
        extra_env: dict[str, str] | None = None,
    ) -> Worker:
        name = f"worker-{next(_worker_numbers)}"
        env = {
            **os.environ,
            "CELERY_BROKER_URL": broker_url,
            "CELERY_RECONCILER_DSN": dsn,
            "HOSTNAME": name,
            "DEMO_LEASE_SECONDS": str(lease_seconds),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        process = processes.ManagedProcess(
            name=f"celery {name}",
            argv=[
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "-Q",
                queue,
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            log_path=tmp_path / f"{name}.log",
            env=env,
        )
        process.start()
        worker = Worker(name=name, process=process)
        started.append(worker)
        process.wait_until(
            lambda: " ready." in worker.log(), timeout_seconds=60, what="ready to consume"
        )
        return worker

    yield start
    for worker in started:
        worker.stop()
