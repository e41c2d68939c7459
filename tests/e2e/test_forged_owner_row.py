"""A forged owner row in the ledger shows as a condition, never as a silent stop (issue 22).

With sharding, one ``UPDATE celery_reconciler.policy_owners`` by a login that may write it
made the operator log "owned by evil/1 ... stops sweeping it" and chase a token no Lease can
carry, while the policy showed ``Ready=True``. Now the replica that holds the policy's Lease
sees that the row disagrees with it and says so on the policy; removing the row heals it.
The apiserver holds the Lease, PostgreSQL the ledger; no worker is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import sharded_app
from e2e_support import OperatorProcess, apply_secrets, get_json, policy_conditions, wait_for
from test_sharding import shard_policy

from celery_reconciler import conditions, ledger
from devstack import kube as devstack_kube


def ready(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, Any]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", "shard-01")
    return dict(policy_conditions(policy).get(conditions.READY, {}))


def test_an_owner_row_the_lease_does_not_back_is_a_condition_until_it_is_removed(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    database_dsn: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        sharded_app.create_tables(conn)
        ledger.ensure_schema(conn)
    start_operator(name="replica-a", sharding_namespace=namespace, extra_args=["--lease-seconds=6"])
    apply_secrets(crds, namespace, dsn=database_dsn, broker_url=redis_url)
    crds.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(shard_policy(1)))
    key = f"{namespace}/shard-01"
    wait_for(
        lambda: ready(crds, namespace).get("reason") == conditions.SWEPT,
        timeout_seconds=90,
        what="the policy swept by its replica",
    )
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        forged = conn.execute(
            # A token no Lease can carry (leaseTransitions is an int32): no takeover can pass
            # it, as in the run.
            "UPDATE celery_reconciler.policy_owners SET holder = 'evil/1', token = 2^40 "
            "WHERE policy_key = %s RETURNING token",
            [key],
        ).fetchone()
        assert forged is not None

        shown = wait_for(
            lambda: (
                (c := ready(crds, namespace)).get("reason") == conditions.OWNER_ROW_DISAGREES and c
            ),
            timeout_seconds=60,
            what="Ready=False OwnerRowDisagrees on the policy",
        )
        assert shown["status"] == "False"
        assert "evil/1" in shown["message"] and f"token {forged[0]}" in shown["message"]

        conn.execute("DELETE FROM celery_reconciler.policy_owners WHERE policy_key = %s", [key])
    wait_for(
        lambda: ready(crds, namespace).get("reason") == conditions.SWEPT,
        timeout_seconds=60,
        what="the policy swept again once the forged row is gone",
    )
