"""Hostile and mistaken policies through the running operator and the real apiserver.

A user's mistake — a predicate of the wrong type, a column that is gone, a Secret that holds
something else, the API server going away — must become a condition with a reason and a
message that names the field to fix, an Event and a metric, while the loop keeps running:
fixing the spec (or the Secret, or the cluster) heals the policy at once, with no
traceback in the operator's log and no Secret text anywhere a `view` user can read.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from e2e_support import (
    OperatorProcess,
    annotate,
    apply_policy,
    apply_secrets,
    get_json,
    metric_value,
    policy_conditions,
    policy_events,
    seed,
    unprocessed,
    wait_for,
)

from celery_reconciler.policy_annotations import SWEEP_NOW
from devstack import kube as devstack_kube
from devstack import processes

POLICY = "journal-insights"


def condition(kube: devstack_kube.ControlPlane, namespace: str, kind: str) -> dict[str, Any]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", POLICY)
    return dict(policy_conditions(policy).get(kind, {}))


def wait_degraded(
    kube: devstack_kube.ControlPlane, namespace: str, *, reason: str, naming: str
) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (
                (c := condition(kube, namespace, "Degraded")).get("reason") == reason
                and naming in c.get("message", "")
                and c
            ),
            timeout_seconds=60,
            what=f"Degraded with reason {reason} naming {naming}",
        )
    )


def wait_ready(kube: devstack_kube.ControlPlane, namespace: str, *, what: str) -> None:
    wait_for(
        lambda: condition(kube, namespace, "Ready").get("status") == "True",
        timeout_seconds=60,
        what=what,
    )


def patch_spec(kube: devstack_kube.ControlPlane, namespace: str, spec: dict[str, Any]) -> None:
    patch = json.dumps({"spec": spec})
    kube.kubectl("-n", namespace, "patch", "processingpolicy", POLICY, "--type=merge", "-p", patch)


def patch_pending(kube: devstack_kube.ControlPlane, namespace: str, pending: Any) -> None:
    patch_spec(kube, namespace, {"source": {"pending": pending}})


def assert_no_loop_traceback(operator: OperatorProcess) -> None:
    log = operator.process.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]
    assert "failed with an exception" not in log  # kopf's words for a daemon that died


def test_a_policy_edited_to_a_wrong_type_or_a_missing_column_degrades_and_the_fix_heals_it(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    seed(journal, 5)
    local_workers("insights-worker-a")
    operator = start_operator()
    # A long sweep interval: only the edit's wake-up can make the loop sweep soon.
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="10m")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=60, what="the first entries")
    wait_ready(crds, namespace, what="Ready after the first sweep")

    patch_pending(crds, namespace, {"column": "insights_extracted", "equals": 1})
    degraded = wait_degraded(
        crds, namespace, reason="SourceInvalid", naming="spec.source.pending.equals"
    )
    assert "boolean = integer" in degraded["message"]
    assert condition(crds, namespace, "Ready")["status"] == "False"

    patch_pending(crds, namespace, {"column": "insights_extractd", "equals": False})
    wait_degraded(crds, namespace, reason="SourceInvalid", naming="spec.source.pending.column")

    seed(journal, 4)
    patch_spec(
        crds,
        namespace,
        {"source": {"pending": {"column": "insights_extracted", "equals": False}}},
    )
    wait_ready(crds, namespace, what="Ready again right after the fix")
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=60,
        what="entries seeded while the spec was wrong to be processed after the fix",
    )
    reasons = [e["reason"] for e in policy_events(crds, namespace)]
    assert "SourceInvalid" in reasons and "Recovered" in reasons
    source_errors = metric_value(
        operator.metrics_text().replace(',reason="SourceInvalid"', ""),
        "celery_reconciler_sweep_errors_total",
        namespace=namespace,
        policy=POLICY,
    )
    assert source_errors >= 2
    assert_no_loop_traceback(operator)


def secret_data(dsn: bytes, url: bytes) -> str:
    def encoded(value: bytes) -> str:
        return base64.b64encode(value).decode()

    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "demo-db"},
                    "data": {"dsn": encoded(dsn)},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "demo-broker"},
                    "data": {"url": encoded(url)},
                },
            ],
        }
    )


def test_secrets_that_are_not_what_they_claim_degrade_the_policy_and_are_never_quoted(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    seed(journal, 6)
    local_workers("insights-worker-a")
    operator = start_operator()
    apply_policy(
        crds, namespace, dsn="s3cretword is-not-a-dsn", broker_url=redis_url, sweep_interval="2s"
    )
    degraded = wait_degraded(
        crds, namespace, reason="SecretInvalid", naming='key "dsn" of secret "demo-db"'
    )
    assert "is not a PostgreSQL DSN" in degraded["message"]
    assert "spec.source.databaseSecretRef" in degraded["message"]

    hostile = [
        (b"\xff\xfes3cret-bytes", redis_url.encode(), "is not UTF-8 text"),
        (b"s3cretkey=value", redis_url.encode(), "is not a PostgreSQL DSN"),
        (journal.encode(), b"redis://:pw@127.0.0.1:s3cretport/0", "is not a broker URL"),
    ]
    for dsn, url, says in hostile:
        crds.kubectl("-n", namespace, "apply", "-f", "-", input=secret_data(dsn, url))
        wait_degraded(crds, namespace, reason="SecretInvalid", naming=says)

    apply_secrets(crds, namespace, dsn=journal, broker_url=redis_url)
    wait_ready(crds, namespace, what="Ready once the Secrets hold a DSN and a URL")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=60, what="all processed")

    everything = "\n".join(
        [
            operator.process.log_path.read_text(),
            crds.kubectl(
                "-n", namespace, "get", "processingpolicy,processingstatus", "-o", "yaml"
            ).stdout,
            crds.kubectl("-n", namespace, "get", "events", "-o", "yaml").stdout,
        ]
    )
    assert "SecretInvalid" in everything
    assert "s3cret" not in everything
    assert_no_loop_traceback(operator)


def sweep_count(operator: OperatorProcess, namespace: str) -> int:
    return operator.process.log_path.read_text().count(f"{namespace}/{POLICY}: swept in")


def restart_apiserver_after(kube: devstack_kube.ControlPlane, outage: Callable[[], None]) -> None:
    """Stop the kube-apiserver, run ``outage()``, start it again and wait until it serves."""
    kube.apiserver.stop(timeout_seconds=10)
    try:
        outage()
    finally:
        kube.apiserver.start()
        kube.apiserver.wait_until(
            lambda: kube.kubectl("get", "--raw=/readyz", check=False).returncode == 0,
            timeout_seconds=90,
            what="ready again (/readyz)",
        )


def test_an_api_server_outage_does_not_stop_the_sweeps_and_the_status_heals_when_it_is_back(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    # The work is in the database: a policy whose Secrets were read keeps sweeping with
    # their last value while the apiserver is away (a chaos run restarting the apiserver
    # once stalled every sweep on the Secret read).
    seed(journal, 5)
    local_workers("insights-worker-a")
    operator = start_operator()
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s")
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=60, what="the first entries")

    def outage() -> None:
        seed(journal, 4)
        wait_for(
            lambda: unprocessed(journal) == 0,
            timeout_seconds=90,
            what="entries seeded while the apiserver is down to be processed",
        )
        wait_for(
            lambda: "until the API server answers" in operator.process.log_path.read_text(),
            timeout_seconds=60,
            what="the log to say the Secret's last value is in use",
        )

    restart_apiserver_after(crds, outage)
    seed(journal, 4)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=120,
        what="entries seeded after the outage to be processed",
    )
    wait_ready(crds, namespace, what="Ready after the apiserver came back")
    assert_no_loop_traceback(operator)


def test_a_tiny_dispatch_rate_keeps_the_loop_alive_and_a_slow_one_is_kept_across_sweeps(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    seed(journal, 4)
    local_workers("insights-worker-a")
    operator = start_operator()
    # The smallest rate the CRD allows: one entry per 100 s.
    limits = {"batchSize": 500, "maxInFlight": 10000, "dispatchPerSecond": 0.01}
    apply_policy(
        crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="10m", limits=limits
    )
    wait_for(lambda: unprocessed(journal) == 3, timeout_seconds=60, what="one entry processed")
    wait_ready(crds, namespace, what="Ready with a rate of one entry per 100 seconds")
    for asked in range(2):
        sweeps_before = sweep_count(operator, namespace)
        annotate(crds, namespace, f"{SWEEP_NOW}={asked}")
        wait_for(
            lambda before=sweeps_before: sweep_count(operator, namespace) > before,
            timeout_seconds=30,
            what="the sweep asked for with sweep-now",
        )
    assert unprocessed(journal) == 3  # the rate allows no second entry, however often it sweeps

    # One entry per 10 s: longer than a sweep may pause, so the loop sweeps again for each.
    patch_spec(crds, namespace, {"limits": {**limits, "dispatchPerSecond": 0.1}})
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=120,
        what="the rest dispatched at the slow rate long before the 10m sweep interval",
    )
    assert_no_loop_traceback(operator)
