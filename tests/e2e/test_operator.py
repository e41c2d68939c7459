"""The operator as a real process against the real apiserver, database, broker and workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from e2e_support import (
    OperatorProcess,
    get_json,
    policy_manifest,
    processingstatus_table,
    secrets_manifest,
    seed,
    tally,
    unprocessed,
    wait_for,
)

from devstack import kube as devstack_kube
from devstack import processes


def test_applying_a_policy_processes_every_entry_and_status_converges(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    worker_pods: Callable[..., processes.ManagedProcess],
) -> None:
    seed(journal, 300)
    worker_pods("insights-worker-a")
    worker_pods("insights-worker-b")
    start_operator()
    crds.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        input=secrets_manifest(dsn=journal, broker_url=redis_url),
    )
    crds.kubectl("-n", namespace, "apply", "-f", "-", input=policy_manifest())

    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="all entries processed")
    table = wait_for(
        lambda: (t := processingstatus_table(crds, namespace)).get("SUCCEEDED") == "300" and t,
        timeout_seconds=60,
        what="kubectl get processingstatus to show 300 succeeded",
    )
    assert table["NAME"] == "journal-insights"
    assert table["PENDING"] == "0"
    assert table["IN-FLIGHT"] == "0"
    assert table["DEAD"] == "0"
    counted = tally(journal)
    assert (counted.processed, counted.runs, counted.duplicate_successes) == (300, 300, 0)

    policy = get_json(crds, "-n", namespace, "get", "processingpolicy", "journal-insights")
    ready = {c["type"]: c for c in policy["status"]["conditions"]}["Ready"]
    assert ready["status"] == "True"
    assert policy["status"]["observedGeneration"] == policy["metadata"]["generation"]


def test_a_missing_secret_degrades_the_policy_until_it_is_created(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    seed(journal, 5)
    start_operator()
    crds.kubectl("-n", namespace, "apply", "-f", "-", input=policy_manifest())

    def condition(kind: str) -> dict[str, Any]:
        policy = get_json(crds, "-n", namespace, "get", "processingpolicy", "journal-insights")
        found = {c["type"]: c for c in (policy.get("status") or {}).get("conditions", [])}
        return found.get(kind, {})

    degraded = wait_for(
        lambda: (c := condition("Degraded")).get("status") == "True" and c,
        timeout_seconds=30,
        what="Degraded=True",
    )
    assert degraded["reason"] == "SecretNotFound"
    assert 'secret "demo-db"' in degraded["message"]
    events = get_json(
        crds,
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=journal-insights",
    )
    assert any(e["reason"] == "SecretNotFound" for e in events["items"])

    crds.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        input=secrets_manifest(dsn=journal, broker_url=redis_url),
    )
    wait_for(
        lambda: condition("Ready").get("status") == "True",
        timeout_seconds=60,
        what="Ready=True after the Secret was created (no restart)",
    )
