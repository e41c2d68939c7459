"""docs/operations.md's "Trust boundaries" section says who may do what with which credential;
this keeps it true to what the code prints and the chart grants (issue 22): every database
role, privilege and worker function ``celery-reconciler grants`` prints is named there, no
function or role that the code does not have, and every resource of the operator's
Kubernetes rules."""

from __future__ import annotations

import io
import re
from pathlib import Path

import yaml

from celery_reconciler import cli, ledger_roles
from celery_reconciler_worker import ledger as worker_ledger

REPOSITORY = Path(__file__).resolve().parents[2]


def section(title: str) -> str:
    guide = (REPOSITORY / "docs" / "operations.md").read_text()
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", guide, re.MULTILINE | re.DOTALL)
    assert found, f'docs/operations.md has no "## {title}" section'
    return found.group(1)


def printed_grants() -> str:
    out = io.StringIO()
    assert cli.main(["grants", "--database", "db", "--table", "public.t"], out=out) == 0
    return out.getvalue()


def test_the_trust_boundaries_name_every_role_and_grant_the_cli_prints() -> None:
    text = section("Trust boundaries")
    printed = printed_grants()
    for role in (
        ledger_roles.DEFAULT_OPERATOR_ROLE,
        ledger_roles.DEFAULT_WORKER_ROLE,
        ledger_roles.DEFAULT_READER_ROLE,
    ):
        assert f"`{role}`" in text, role
        assert f'"{role}"' in printed, role
    functions = {function.name for function in worker_ledger.WORKER_FUNCTIONS}
    assert set(re.findall(r"\bworker_\w+", text)) == functions
    assert set(re.findall(r'FUNCTION "celery_reconciler"\."(\w+)"', printed)) == functions
    for privilege, target in re.findall(
        r"^GRANT ([A-Z, ]+) ON (?:TABLE |SCHEMA )?(.+?) TO", printed, re.MULTILINE
    ):
        if privilege == "EXECUTE" or target.startswith('"public"'):
            continue  # the functions are checked above; the user's table is an example
        name = target.replace('"', "").removeprefix("DATABASE ").removeprefix("celery_reconciler.")
        assert f"`{privilege}`" in text, privilege
        assert name == "db" or f"`{name}`" in text, name
    named_roles = set(re.findall(r"`(celery_reconciler_\w+)`", text)) - functions
    assert named_roles <= {
        ledger_roles.DEFAULT_OPERATOR_ROLE,
        ledger_roles.DEFAULT_WORKER_ROLE,
        ledger_roles.DEFAULT_READER_ROLE,
    }


def chart_rules() -> list[dict[str, object]]:
    helpers = REPOSITORY / "charts" / "celery-reconciler" / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    rules: list[dict[str, object]] = []
    for name in ("rbac.namespacedRules", "rbac.crdRule"):
        body = re.search(
            rf'define "celery-reconciler\.{re.escape(name)}" -}}}}\n(.*?)\{{\{{- end',
            text,
            re.DOTALL,
        )
        assert body, name
        rules += yaml.safe_load(body.group(1))
    sharding = REPOSITORY / "charts/celery-reconciler/templates/operator/sharding-role.yaml"
    leases = re.search(r"rules:\n(.*?)---", sharding.read_text(), re.DOTALL)
    assert leases
    rules += yaml.safe_load(leases.group(1))
    return rules


def test_the_trust_boundaries_name_every_kubernetes_right_of_the_operator() -> None:
    operator_row = next(
        line
        for line in section("Trust boundaries").splitlines()
        if line.startswith("| the operator's ServiceAccount")
    )
    for rule in chart_rules():
        resources, verbs = rule["resources"], rule["verbs"]
        assert isinstance(resources, list) and isinstance(verbs, list)
        for resource in resources:
            # A resource granted twice (everywhere served, and in the release namespace
            # with sharding) is named with each grant's verbs.
            shown = [
                found.group(1).strip().rstrip(",").split(", ")
                for found in re.finditer(
                    rf"`{re.escape(resource)}`[^`|]*?: ([a-z, ]+)", operator_row
                )
            ]
            assert verbs in shown, (resource, verbs, shown)
