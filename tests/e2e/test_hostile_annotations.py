"""Annotations are input: a bad one is removed with a Warning Event, and never stops a policy.

Issue 22, through the real apiserver and operator. Anyone with ``edit`` on a policy can write
its annotations: the operator's requests (``retry-dead``, ``sweep-now``) and kopf's own
record of the last spec it handled. Before, a NUL byte in ``retry-dead`` turned the policy
``Ready=False InternalError`` until a person removed it, and a diff-base that was not JSON
made kopf fail at every event: a new policy got no status at all and ``kubectl delete`` of
a live one hung on the finalizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from e2e_support import (
    OperatorProcess,
    apply_policy,
    apply_secrets,
    get_json,
    policy_conditions,
    policy_events,
    policy_manifest,
    seed,
    unprocessed,
    wait_for,
)

from celery_reconciler import policy_annotations
from devstack import kube as devstack_kube
from devstack import processes

pytestmark = pytest.mark.e2e

POLICY = "journal-insights"
# Each a value someone could set with `kubectl patch`: JSON escapes carry what argv cannot.
HOSTILE_RETRY_DEAD = ("7\u0000", "\u0001", "1,\u001b[31m2", "\u007f", "x" * 300)


def set_annotation(kube: devstack_kube.ControlPlane, namespace: str, key: str, value: str) -> None:
    patch = json.dumps({"metadata": {"annotations": {key: value}}})
    kube.kubectl("-n", namespace, "patch", "processingpolicy", POLICY, "--type=merge", "-p", patch)


def annotations_of(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, str]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", POLICY)
    return dict(policy["metadata"].get("annotations") or {})


def ready(kube: devstack_kube.ControlPlane, namespace: str) -> dict[str, Any]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", POLICY)
    return dict(policy_conditions(policy).get("Ready", {}))


def warnings_naming(kube: devstack_kube.ControlPlane, namespace: str, key: str) -> list[str]:
    return [
        event["message"]
        for event in policy_events(kube, namespace)
        if event["type"] == "Warning"
        and event["reason"] == "InvalidRequest"
        and key in event["message"]
    ]


def test_control_characters_and_oversized_ids_in_retry_dead_are_removed_and_the_policy_sweeps_on(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    local_workers("insights-worker-a")
    operator = start_operator()
    apply_policy(crds, namespace, dsn=journal, broker_url=redis_url, sweep_interval="2s")
    wait_for(
        lambda: ready(crds, namespace).get("status") == "True", timeout_seconds=60, what="Ready"
    )
    key = policy_annotations.RETRY_DEAD
    for number, value in enumerate(HOSTILE_RETRY_DEAD, start=1):
        set_annotation(crds, namespace, key, value)
        wait_for(
            lambda: key not in annotations_of(crds, namespace),
            timeout_seconds=30,
            what=f"the operator to remove {key}={value!r}",
        )
        wait_for(
            lambda number=number: len(warnings_naming(crds, namespace, key)) >= number,
            timeout_seconds=30,
            what=f"a Warning Event naming {key} for {value!r}",
        )
        assert ready(crds, namespace).get("status") == "True", ready(crds, namespace)
    # The messages show the values escaped, never the raw control characters.
    for message in warnings_naming(crds, namespace, key):
        assert not any(ord(character) < 0x20 or ord(character) == 0x7F for character in message)
    seed(journal, 3)
    wait_for(
        lambda: unprocessed(journal) == 0,
        timeout_seconds=60,
        what="new entries to be processed after the hostile requests",
    )
    log = operator.process.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]
    assert "InternalError" not in log


def test_a_corrupt_diff_base_neither_hides_a_new_policy_nor_blocks_deleting_a_live_one(
    crds: devstack_kube.ControlPlane,
    namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
) -> None:
    operator = start_operator()
    key = policy_annotations.DIFFBASE
    apply_secrets(crds, namespace, dsn=journal, broker_url=redis_url)
    manifest = json.loads(policy_manifest(sweep_interval="2s"))
    manifest["metadata"]["annotations"] = {key: "{not json"}
    crds.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(manifest))
    wait_for(
        lambda: ready(crds, namespace).get("status") == "True",
        timeout_seconds=60,
        what="a policy created with a corrupt diff-base to become Ready",
    )
    wait_for(
        lambda: warnings_naming(crds, namespace, key),
        timeout_seconds=30,
        what=f"a Warning Event naming {key}",
    )

    set_annotation(crds, namespace, key, "[1, 2")  # now on a live policy
    deleted = crds.kubectl(
        "-n", namespace, "delete", "processingpolicy", POLICY, "--timeout=60s", check=False
    )
    assert deleted.returncode == 0, deleted.stderr
    gone = crds.kubectl("-n", namespace, "get", "processingpolicy", POLICY, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    log = operator.process.log_path.read_text()
    assert "JSONDecodeError" not in log, log[-4000:]
