"""Helpers shared by the integration tests (fixtures live in ``conftest.py``).

They read outcomes from the DATABASE (the ledger here; ``task_runs`` through
``celery_app.demo.audit``, which ``make demo`` uses too), never from test memory, and
``sweep_until`` is the real ``reconcile_once`` called repeatedly, as the operator's timer would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from celery_app.demo import schema
from celery_reconciler import broker, policy, reconcile
from devstack import processes


@dataclasses.dataclass
class Worker:
    name: str
    process: processes.ManagedProcess

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: a crashed or OOM-killed pod."""
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(timeout_seconds=20)


WorkerFactory = Callable[..., Worker]


def make_policy(
    *,
    lease_timeout: str = "30s",
    retry: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    task_name: str = schema.TASK_NAME,
    name: str = "journal-insights",
) -> policy.Policy:
    spec = schema.policy_spec(
        lease_timeout=lease_timeout,
        retry=retry or {"maxAttempts": 5, "initialDelay": "1s", "factor": 2, "maxDelay": "5s"},
        limits=limits,
        task_name=task_name,
    )
    return policy.parse_policy(spec, namespace="test", name=name)


def pending_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM journal_entry WHERE NOT insights_extracted").fetchone()
    assert row is not None
    return int(row[0])


def sweep_until(
    done: Callable[[], bool],
    *,
    policy_: policy.Policy,
    dsn: str,
    broker_url: str,
    timeout_seconds: float,
    interval_seconds: float = 0.3,
    what: str = "all entries processed",
) -> list[reconcile.SweepResult]:
    """Sweep like the operator's timer until ``done()``; fail with the last state if not."""
    results: list[reconcile.SweepResult] = []
    with sweep_connections(dsn, broker_url) as (db, publisher):
        deadline = time.monotonic() + timeout_seconds
        while True:
            results.append(reconcile.reconcile_once(policy_, db=db, broker=publisher))
            if done():
                return results
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} after {timeout_seconds}s; last sweep: {results[-1]}")
            time.sleep(interval_seconds)


@contextlib.contextmanager
def sweep_connections(
    dsn: str, broker_url: str
) -> Iterator[tuple[reconcile.Database, broker.Publisher]]:
    """What the operator holds per policy, for calling ``reconcile`` directly; closed after."""
    db = reconcile.Database(dsn)
    publisher = broker.connect(broker_url)
    try:
        yield db, publisher
    finally:
        publisher.close()
        db.close()


def retry_dead(policy_: policy.Policy, *, dsn: str) -> int:
    """``reconcile.retry_dead`` on a database connection of its own, closed after."""
    db = reconcile.Database(dsn)
    try:
        return reconcile.retry_dead(policy_, db=db)
    finally:
        db.close()


def wait_for(
    condition: Callable[[], bool], *, timeout_seconds: float, what: str, poll_seconds: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds}s waiting for {what}")
        time.sleep(poll_seconds)
