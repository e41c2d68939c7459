"""The CRDs against the real apiserver: what `kubectl apply` accepts, fills in and refuses.

The policy's first line of defence is the apiserver itself: a bad identifier, a SQL fragment,
a zero duration or an unknown key never reaches the operator, and the person applying it reads
a message that names the field. The CRDs are applied from their one source,
``charts/celery-reconciler/files/crds/``.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_reconciler import policy
from devstack import kube as devstack_kube

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "charts" / "celery-reconciler" / "files" / "crds"
SAMPLES = ROOT / "manifests" / "samples"
SAMPLE_POLICY = yaml.safe_load((SAMPLES / "processingpolicy.yaml").read_text())
CRD_NAMES = (
    "processingpolicies.celery-reconciler.io",
    "processingstatuses.celery-reconciler.io",
)


@pytest.fixture(scope="module")
def applied_crds(kube: devstack_kube.ControlPlane) -> None:
    kube.kubectl("apply", "-f", str(CRD_DIR))
    for name in CRD_NAMES:
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")


def _schema(file_name: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRD_DIR / file_name).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _fields_without_description(node: dict[str, Any], path: str) -> Iterator[str]:
    for name, child in node.get("properties", {}).items():
        child_path = f"{path}.{name}"
        if name != "metadata" and not child.get("description"):
            yield child_path
        yield from _fields_without_description(child, child_path)
    for key in ("items", "additionalProperties"):
        child = node.get(key)
        if isinstance(child, dict):
            if not child.get("description"):
                yield f"{path}[{key}]"
            yield from _fields_without_description(child, f"{path}[{key}]")


@pytest.mark.parametrize("file_name", ["processingpolicies.yaml", "processingstatuses.yaml"])
def test_every_field_has_a_description(file_name: str) -> None:
    assert list(_fields_without_description(_schema(file_name), "")) == []


def _apply(
    kube: devstack_kube.ControlPlane, namespace: str, doc: dict[str, Any], *extra: str
) -> Any:
    return kube.kubectl(
        "-n", namespace, "apply", *extra, "-f", "-", input=json.dumps(doc), check=False
    )


def test_sample_policy_is_accepted_with_defaults_filled(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None
) -> None:
    kube.kubectl("-n", namespace, "apply", "-f", str(SAMPLES))
    policy = json.loads(
        kube.kubectl("-n", namespace, "get", "ppol", "journal-insights", "-o", "json").stdout
    )
    spec = policy["spec"]
    assert spec["source"]["databaseSecretRef"] == {"name": "mindjourney-db", "key": "dsn"}
    assert spec["source"]["idColumn"] == "id"
    assert spec["source"]["pending"] == {"column": "insights_extracted", "equals": False}
    assert spec["task"]["brokerSecretRef"] == {"name": "celery-broker", "key": "url"}
    assert spec["task"]["queue"] == "insights"
    assert spec["schedule"] == {"sweepInterval": "5m", "suspend": False}
    assert spec["retry"] == {
        "maxAttempts": 5,
        "initialDelay": "60s",
        "factor": 2,
        "maxDelay": "1h",
        "jitter": True,
    }
    assert spec["lease"] == {"timeout": "15m"}
    assert spec["limits"] == {"batchSize": 500, "maxInFlight": 10000, "dispatchPerSecond": 0}

    table = kube.kubectl("-n", namespace, "get", "processingpolicy").stdout.splitlines()
    assert table[0].split() == ["NAME", "TABLE", "TASK", "SUSPENDED", "READY", "AGE"]
    assert table[1].split()[:4] == [
        "journal-insights",
        "public.journal_entry",
        "insights.tasks.extract_insights_task",
        "false",
    ]
    by_category = kube.kubectl("-n", namespace, "get", "celery-reconciler", "-o", "name").stdout
    assert "processingpolicy.celery-reconciler.io/journal-insights" in by_category


def _policy(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(SAMPLE_POLICY)
    doc["metadata"]["name"] = f"p-{uuid.uuid4().hex[:8]}"
    mutate(doc["spec"])
    return doc


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, leaf = path.split(".")

    def mutate(spec: dict[str, Any]) -> None:
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, leaf = path.split(".")

    def mutate(spec: dict[str, Any]) -> None:
        node = spec
        for key in parents:
            node = node[key]
        del node[leaf]

    return mutate


INVALID_POLICIES = {
    "table with a space": (_set("source.table", "journal entry"), ["spec.source.table"]),
    "three-part table": (_set("source.table", "a.b.c"), ["spec.source.table"]),
    "SQL in the pending column": (
        _set("source.pending.column", "id; drop table x"),
        ["spec.source.pending.column", "id; drop table x"],
    ),
    "SQL in idColumn": (_set("source.idColumn", "id) OR (1=1"), ["spec.source.idColumn"]),
    "SQL in orderBy": (_set("source.orderBy", "created_at desc"), ["spec.source.orderBy"]),
    "quoted identifier": (_set("source.table", '"journal_entry"'), ["spec.source.table"]),
    "task name with a call": (_set("task.name", "os.system('x')"), ["spec.task.name"]),
    "zero lease": (_set("lease.timeout", "0s"), ["spec.lease.timeout", "greater than 0s"]),
    "zero initial delay": (
        _set("retry.initialDelay", "0ms"),
        ["spec.retry.initialDelay", "greater than 0s"],
    ),
    "negative max delay": (_set("retry.maxDelay", "-1h"), ["spec.retry.maxDelay"]),
    "zero sweep interval": (
        _set("schedule.sweepInterval", "0m"),
        ["spec.schedule.sweepInterval", "at least 1s"],
    ),
    "duration without unit": (_set("lease.timeout", "900"), ["spec.lease.timeout"]),
    "maxAttempts 0": (_set("retry.maxAttempts", 0), ["spec.retry.maxAttempts"]),
    "factor below 1": (_set("retry.factor", 0.5), ["spec.retry.factor"]),
    "batch larger than maxInFlight": (
        _set("limits", {"batchSize": 600, "maxInFlight": 500}),
        ["spec.limits.batchSize", "must not exceed limits.maxInFlight"],
    ),
    "maxDelay below initialDelay": (
        _set("retry", {"initialDelay": "2h", "maxDelay": "1h"}),
        ["spec.retry.maxDelay", "at least retry.initialDelay"],
    ),
    "two pending operators": (
        _set("source.pending.isNull", True),
        ["spec.source.pending", "only one", "Found 2"],
    ),
    "in and isNull": (
        _set("source.pending", {"column": "status", "in": ["new"], "isNull": True}),
        ["spec.source.pending", "Found 2"],
    ),
    "no pending operator": (
        _drop("source.pending.equals"),
        ["spec.source.pending", "Found none"],
    ),
    "empty in": (
        _set("source.pending", {"column": "status", "in": []}),
        ["spec.source.pending.in"],
    ),
    "equals an object": (_set("source.pending.equals", {"a": 1}), ["spec.source.pending.equals"]),
    "equals a list": (_set("source.pending.equals", ["new"]), ["spec.source.pending.equals"]),
    "equals a fraction": (_set("source.pending.equals", 1.5), ["spec.source.pending.equals"]),
    "empty pod selector": (
        _set("workers.podSelector", {}),
        ["spec.workers.podSelector", "must select something"],
    ),
    "secret name not a DNS name": (
        _set("source.databaseSecretRef.name", "My_DB"),
        ["spec.source.databaseSecretRef.name"],
    ),
    "missing task": (_drop("task"), ["spec.task"]),
    "unknown key in source": (_set("source.where", "1=1"), ['unknown field "spec.source.where"']),
    "unknown key in spec": (_set("sweepEvery", "5m"), ['unknown field "spec.sweepEvery"']),
}


@pytest.mark.parametrize("case", list(INVALID_POLICIES))
def test_invalid_policy_is_refused_by_kubectl_apply_naming_the_field(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None, case: str
) -> None:
    mutate, expected = INVALID_POLICIES[case]
    doc = _policy(mutate)
    refused = _apply(kube, namespace, doc)
    assert refused.returncode != 0, refused.stdout
    for fragment in expected:
        assert fragment in refused.stderr
    absent = kube.kubectl("-n", namespace, "get", "ppol", doc["metadata"]["name"], check=False)
    assert "NotFound" in absent.stderr


VALID_PREDICATES = {
    "boolean flag": {"column": "insights_extracted", "equals": False},
    "integer": {"column": "state", "equals": 0},
    "string": {"column": "state", "equals": "new"},
    "set of strings": {"column": "status", "in": ["new", "failed"]},
    "timestamp is null": {"column": "processed_at", "isNull": True},
    "column is not null": {"column": "error", "isNull": False},
}


@pytest.mark.parametrize("case", list(VALID_PREDICATES))
def test_every_kind_of_pending_predicate_is_accepted_as_written(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None, case: str
) -> None:
    predicate = VALID_PREDICATES[case]
    doc = _policy(_set("source.pending", predicate))
    doc["spec"]["source"]["table"] = "Reporting.JournalEntry"
    applied = _apply(kube, namespace, doc)
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(
        kube.kubectl("-n", namespace, "get", "ppol", doc["metadata"]["name"], "-o", "json").stdout
    )
    assert stored["spec"]["source"]["pending"] == predicate
    assert stored["spec"]["source"]["table"] == "Reporting.JournalEntry"


def test_broker_transport_options_are_stored_as_celery_spells_them(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None
) -> None:
    """kombu's defaults included: a separator of control characters, priority steps."""
    options = {
        "global_keyprefix": "app-one:",
        "unacked_key": "app_one_unacked",
        "unacked_index_key": "app_one_unacked_index",
        "sep": "\x06\x16",
        "priority_steps": [0, 3, 6, 9],
    }
    doc = _policy(_set("task.brokerTransportOptions", options))
    applied = _apply(kube, namespace, doc)
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(
        kube.kubectl("-n", namespace, "get", "ppol", doc["metadata"]["name"], "-o", "json").stdout
    )
    assert stored["spec"]["task"]["brokerTransportOptions"] == options
    parsed = policy.parse_policy(stored["spec"], namespace=namespace, name=doc["metadata"]["name"])
    assert parsed.task.transport_options() == options

    refused = _apply(kube, namespace, _policy(_set("task.brokerTransportOptions.sep", "")))
    assert refused.returncode != 0
    assert "spec.task.brokerTransportOptions.sep" in refused.stderr


def test_unknown_keys_are_refused_by_strict_field_validation_not_kept(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None
) -> None:
    """The schema prunes unknown keys; kubectl's default (Strict) makes that a refusal."""
    doc = _policy(_set("retry.maxAttemps", 3))
    refused = _apply(kube, namespace, doc)
    assert refused.returncode != 0
    assert 'unknown field "spec.retry.maxAttemps"' in refused.stderr

    pruned = _apply(kube, namespace, doc, "--validate=ignore")
    assert pruned.returncode == 0, pruned.stderr
    stored = json.loads(
        kube.kubectl("-n", namespace, "get", "ppol", doc["metadata"]["name"], "-o", "json").stdout
    )
    assert "maxAttemps" not in stored["spec"]["retry"]
    assert stored["spec"]["retry"]["maxAttempts"] == 5


def _condition(status: str) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": status,
        "observedGeneration": 1,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "reason": "SweepSucceeded",
        "message": "the last sweep reached the database and the broker",
    }


def test_policy_status_is_a_subresource_with_standard_conditions(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None
) -> None:
    doc = _policy(lambda spec: None)
    name = doc["metadata"]["name"]
    doc["status"] = {"observedGeneration": 7}
    assert _apply(kube, namespace, doc).returncode == 0
    stored = json.loads(kube.kubectl("-n", namespace, "get", "ppol", name, "-o", "json").stdout)
    assert "status" not in stored, "a status written through the main resource must be ignored"

    status = {
        "observedGeneration": 1,
        "lastSweepTime": "2026-01-01T00:00:00Z",
        "conditions": [_condition("True")],
    }
    kube.kubectl(
        "-n", namespace, "patch", "ppol", name, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    row = kube.kubectl("-n", namespace, "get", "ppol", name, "--no-headers").stdout.split()
    assert row[4] == "True"

    bad = dict(_condition("Maybe"), reason="not camel case")
    refused = kube.kubectl(
        "-n", namespace, "patch", "ppol", name, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"conditions": [bad]}}), check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "status.conditions[0].status" in refused.stderr
    assert "status.conditions[0].reason" in refused.stderr


def test_processing_status_columns_answer_is_my_work_getting_done(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None
) -> None:
    status: dict[str, Any] = {
        "apiVersion": "celery-reconciler.io/v1alpha1",
        "kind": "ProcessingStatus",
        "metadata": {"name": "journal-insights"},
        "status": {
            "policyGeneration": 1,
            "pending": 12,
            "inFlight": 500,
            "retrying": 3,
            "succeeded": 9000,
            "dead": 1,
            "oldestPendingSeconds": 42,
            "lastSweepTime": "2026-01-01T00:00:00Z",
            "lastDispatched": 500,
            "lastRescue": {"pod": "insights-worker-0", "count": 7, "time": "2026-01-01T00:00:00Z"},
            "conditions": [_condition("True")],
        },
    }
    # No status subresource: one create carries the counts.
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(status))
    table = kube.kubectl("-n", namespace, "get", "processingstatus").stdout.splitlines()
    assert table[0].split() == [
        "NAME", "PENDING", "IN-FLIGHT", "RETRYING", "SUCCEEDED", "DEAD", "OLDEST(S)",
        "LAST-SWEEP", "READY",
    ]  # fmt: skip
    row = table[1].split()
    assert row[:7] == ["journal-insights", "12", "500", "3", "9000", "1", "42"]
    assert row[8] == "True"
    wide = kube.kubectl("-n", namespace, "get", "pst", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-2:] == ["DISPATCHED", "LAST-RESCUE-POD"]
    assert wide[1].split()[-2:] == ["500", "insights-worker-0"]

    negative = copy.deepcopy(status)
    negative["status"]["pending"] = -1
    refused = kube.kubectl(
        "-n", namespace, "apply", "-f", "-", input=json.dumps(negative), check=False
    )
    assert refused.returncode != 0 and "status.pending" in refused.stderr


def test_processing_status_is_garbage_collected_with_its_policy(
    kube: devstack_kube.ControlPlane, namespace: str, applied_crds: None
) -> None:
    """What the operator does (ownerReference to the policy) is enough for deletion to cascade."""
    doc = _policy(lambda spec: None)
    name = doc["metadata"]["name"]
    assert _apply(kube, namespace, doc).returncode == 0
    uid = kube.kubectl(
        "-n", namespace, "get", "ppol", name, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    owned = {
        "apiVersion": "celery-reconciler.io/v1alpha1",
        "kind": "ProcessingStatus",
        "metadata": {
            "name": name,
            "ownerReferences": [
                {
                    "apiVersion": "celery-reconciler.io/v1alpha1",
                    "kind": "ProcessingPolicy",
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "status": {"pending": 1},
    }
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(owned))
    kube.kubectl("-n", namespace, "delete", "ppol", name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if kube.kubectl("-n", namespace, "get", "pst", name, check=False).returncode != 0:
            return
        time.sleep(0.2)
    pytest.fail(f"ProcessingStatus {name} outlived its policy by 30 s")
