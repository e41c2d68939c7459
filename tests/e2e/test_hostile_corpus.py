"""The hostile-input corpus (``hostile_corpus.CASES``) against the real apiserver and operator.

Every case is applied on its own: refusals with ``kubectl apply --dry-run=server`` (the
apiserver's full validation, nothing stored), cases that must be accepted for real. Then a
valid policy beside them, in the same namespace, must still process new entries, every
accepted case must show its ``Degraded`` reason, and the operator's log must hold no
traceback.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from e2e_support import (
    OperatorProcess,
    apply_secrets,
    get_json,
    policy_conditions,
    seed,
    unprocessed,
    wait_for,
)
from hostile_corpus import CASES, VALID_SPEC, Case

from devstack import kube as devstack_kube
from devstack import processes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def corpus_namespace(crds: devstack_kube.ControlPlane) -> Iterator[str]:
    """One namespace for the whole corpus, so the valid policy lives beside the cases."""
    name = f"corpus-{uuid.uuid4().hex[:8]}"
    crds.kubectl("create", "namespace", name)
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _manifest(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "celery-reconciler.io/v1alpha1",
            "kind": "ProcessingPolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def _case_name(case: Case) -> str:
    return f"case-{CASES.index(case)}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_policy_has_its_promised_outcome(
    crds: devstack_kube.ControlPlane, corpus_namespace: str, case: Case
) -> None:
    dry_run = ["--dry-run=server"] if case.expect == "refused" else []
    result = crds.kubectl(
        "-n", corpus_namespace, "apply", *dry_run, "-f", "-",
        input=_manifest(_case_name(case), case.spec()), check=False,
    )  # fmt: skip
    if case.expect == "degraded":
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert case.field in result.stderr
    if case.reason is not None:
        assert case.reason in result.stderr


def test_after_the_corpus_a_valid_policy_still_processes_new_entries(
    crds: devstack_kube.ControlPlane,
    corpus_namespace: str,
    journal: str,
    redis_url: str,
    start_operator: Callable[..., OperatorProcess],
    local_workers: Callable[..., processes.ManagedProcess],
) -> None:
    # The accepted cases use demo-db and demo-broker; the valid policy has Secrets of its
    # own, so that it does not overlap them (same Secret, same table) and yield.
    apply_secrets(crds, corpus_namespace, dsn=journal, broker_url=redis_url)
    crds.kubectl(
        "-n", corpus_namespace, "create", "secret", "generic", "valid-db",
        f"--from-literal=dsn={journal}",
    )  # fmt: skip
    crds.kubectl(
        "-n", corpus_namespace, "create", "secret", "generic", "valid-broker",
        f"--from-literal=url={redis_url}",
    )  # fmt: skip
    spec = json.loads(json.dumps(VALID_SPEC))
    spec["source"]["databaseSecretRef"]["name"] = "valid-db"
    spec["task"]["brokerSecretRef"]["name"] = "valid-broker"
    local_workers("corpus-worker")
    operator = start_operator(namespaces=(corpus_namespace,))
    crds.kubectl("-n", corpus_namespace, "apply", "-f", "-", input=_manifest("valid", spec))
    wait_for(
        lambda: _condition(crds, corpus_namespace, "valid", "Ready").get("status") == "True",
        timeout_seconds=60,
        what="the valid policy Ready",
    )

    seed(journal, 25)
    wait_for(lambda: unprocessed(journal) == 0, timeout_seconds=120, what="new entries processed")

    for case in (case for case in CASES if case.expect == "degraded"):
        degraded = wait_for(
            lambda case=case: (
                (c := _condition(crds, corpus_namespace, _case_name(case), "Degraded")).get(
                    "reason"
                )
                == case.reason
                and c
            ),
            timeout_seconds=60,
            what=f"{case.name}: Degraded with reason {case.reason}",
        )
        assert case.field in degraded["message"]
    stored = get_json(crds, "-n", corpus_namespace, "get", "processingpolicies")
    accepted = {_case_name(case) for case in CASES if case.expect == "degraded"} | {"valid"}
    assert {item["metadata"]["name"] for item in stored["items"]} == accepted
    assert "Traceback" not in operator.process.log_path.read_text()


def _condition(
    kube: devstack_kube.ControlPlane, namespace: str, name: str, type_: str
) -> dict[str, Any]:
    policy = get_json(kube, "-n", namespace, "get", "processingpolicy", name)
    return policy_conditions(policy).get(type_, {})
