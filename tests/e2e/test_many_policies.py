"""Many policies on one database: every one Ready and processing, within the connection bound.

One operator process, one PostgreSQL, one worker; a policy per table (``devstack.scale_app``).
The operator's connections are counted by PostgreSQL itself (``pg_stat_activity``, by
application name), sampled the whole time from before the first policy exists until the
last one is Ready and every row is processed. The bound is set small on purpose, well below
the number of policies, so the policies must wait for each other's connections. The 500-policy
run, with RSS, idle CPU and API writes, is ``make bench`` (``benchmarks/policies.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_support import OperatorProcess, apply_secrets, get_json, wait_for

from celery_reconciler import pools
from devstack import kube as devstack_kube
from devstack import scale_app, workers

pytestmark = pytest.mark.e2e

POLICIES = 200
ROWS_EACH = 3
BOUND = 5


def test_hundreds_of_policies_are_ready_and_process_rows_within_the_connection_bound(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    database_dsn: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    tmp_path: Path,
) -> None:
    scale_app.create_tables(database_dsn, count=POLICIES, rows_each=ROWS_EACH)
    worker = workers.start_worker(
        pod_name="scale-worker",
        broker_url=redis_url,
        dsn=database_dsn,
        log_dir=tmp_path,
        concurrency=2,
        app="devstack.scale_app",
        queue=scale_app.QUEUE,
        extra_env={"SCALE_TABLES": str(POLICIES)},
    )
    try:
        with scale_app.ConnectionSampler(database_dsn) as sampler:
            start_operator(extra_env={pools.MAX_CONNECTIONS_ENV: str(BOUND)})
            apply_secrets(crds, namespace, dsn=database_dsn, broker_url=redis_url)
            crds.kubectl(
                "-n",
                namespace,
                "apply",
                "-f",
                "-",
                input=scale_app.policies_manifest(count=POLICIES),
            )
            wait_for(
                lambda: scale_app.pending_tables(database_dsn, count=POLICIES) == [],
                timeout_seconds=300,
                interval=3.0,  # each look reads every table: leave the CPU to the operator
                what=f"every row of all {POLICIES} tables processed",
            )
            wait_for(
                lambda: (
                    scale_app.not_ready(
                        get_json(crds, "-n", namespace, "get", "processingpolicy")["items"]
                    )
                    == []
                ),
                timeout_seconds=300,
                interval=3.0,
                what=f"all {POLICIES} policies Ready",
            )
    finally:
        worker.stop()

    assert scale_app.processed_rows(database_dsn, count=POLICIES) == POLICIES * ROWS_EACH
    assert sampler.samples > 0
    # At least one connection was seen (the sampler works), and never more than the bound.
    assert 0 < sampler.peak <= BOUND, f"operator connections peaked at {sampler.peak}"
