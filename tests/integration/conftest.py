"""Integration fixtures: the demo schema in a fresh database, and real ``celery worker``s.

Workers are ``celery -A celery_app.demo worker`` subprocesses started by
``devstack.workers.start_worker``, as for e2e and ``make demo`` — each in its own process
group, so ``kill()`` is a ``kill -9`` of the whole worker (main process and pool children)
like a crashed pod, and each logging to a file that a failing test prints. Their
``HOSTNAME`` is the worker name the ledger records.

Plain helpers (sweep loops) are in ``reconcile_support``; the run analysis is
``celery_app.demo.audit``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from reconcile_support import Worker, WorkerFactory

from celery_app.demo import schema
from devstack import workers

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
    """``start_worker(broker_url=..., dsn=..., concurrency=2, lease_seconds=..., pool=...)``."""
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
        pool: str = "prefork",
    ) -> Worker:
        name = f"worker-{next(_worker_numbers)}"
        process = workers.start_worker(
            pod_name=name,
            broker_url=broker_url,
            dsn=dsn,
            log_dir=tmp_path,
            concurrency=concurrency,
            app=app,
            queue=queue,
            lease_seconds=lease_seconds,
            extra_env=extra_env,
            pool=pool,
        )
        worker = Worker(name=name, process=process)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
