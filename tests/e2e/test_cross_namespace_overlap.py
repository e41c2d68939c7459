"""The database arbitrates overlapping policies, across namespaces and DSN spellings.

Issue 22: a policy in a second namespace naming the same table and task was ``Ready=True``
and dispatched the same rows — 39 entries ran their body twice. The overlap check compared
policies of one namespace, through the Secret they name. Here the two policies live in two
namespaces and reach one database through two spellings of its DSN (a URL, and libpq's
key=value form); the ledger of that database decides.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from e2e_support import (
    OperatorProcess,
    apply_policy,
    get_json,
    policy_conditions,
    seed,
    unprocessed,
    wait_for,
)
from psycopg import conninfo

from celery_app.demo import audit, schema
from devstack import kube as devstack_kube
from devstack import processes

pytestmark = pytest.mark.e2e

POLICY = "journal-insights"
ENTRIES = 12


def key_value_spelling(dsn: str) -> str:
    """The same database, spelled as libpq key=value pairs instead of a URL."""
    params = conninfo.conninfo_to_dict(dsn)
    return " ".join(f"{key}={value}" for key, value in sorted(params.items()))


def condition(kube: devstack_kube.ControlPlane, namespace: str, kind: str) -> dict[str, Any]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", POLICY)
    return dict(policy_conditions(policy).get(kind, {}))


def runs_per_entry(dsn: str) -> collections.Counter[int]:
    with psycopg.connect(dsn) as conn:
        return collections.Counter(run.entry_id for run in audit.runs(conn))


def slow_bodies(dsn: str, entry_ids: range) -> None:
    # Long enough that both policies' sweeps would dispatch an entry before its first run
    # marks it processed.
    with psycopg.connect(dsn, autocommit=True) as conn:
        for entry_id in entry_ids:
            schema.set_fault(conn, entry_id=entry_id, kind="sleep", seconds=1.0)


def test_a_other_namespace_naming_the_same_table_and_task_yields_and_nothing_runs_twice(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    other_namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    local_workers("insights-worker-a", concurrency=4)
    start_operator()
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s")
    wait_for(
        lambda: condition(crds, namespace, "Ready").get("status") == "True",
        timeout_seconds=60,
        what="the first policy to be Ready",
    )
    apply_policy(
        crds,
        other_namespace,
        dsn=key_value_spelling(journal),
        broker_url=redis_url,
        sweep_interval="2s",
    )
    ready = wait_for(
        lambda: (c := condition(crds, other_namespace, "Ready")).get("reason") and c,
        timeout_seconds=60,
        what="the second policy's first verdict",
    )
    assert ready["status"] == "False" and ready["reason"] == "Conflict", ready
    assert f"{namespace}/{POLICY}" in ready["message"]

    slow_bodies(journal, range(1, ENTRIES + 1))
    seed(journal, ENTRIES)
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=90, what="every entry processed")
    runs = runs_per_entry(journal)
    assert sorted(runs) == list(range(1, ENTRIES + 1))
    assert [entry for entry, count in runs.items() if count > 1] == []

    # Deleting the older policy lets the younger one take the table over.
    crds.kubectl("-n", namespace, "delete", "processingpolicy", POLICY, "--timeout=60s")
    wait_for(
        lambda: condition(crds, other_namespace, "Ready").get("status") == "True",
        timeout_seconds=60,
        what="the second policy to run once the first is gone",
    )
    seed(journal, 3)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=60,
        what="entries seeded after the handover processed by the second policy",
    )
    runs = runs_per_entry(journal)
    assert len(runs) == ENTRIES + 3
    assert [entry for entry, count in runs.items() if count > 1] == []
